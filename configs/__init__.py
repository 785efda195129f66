"""Configs: `--config configs/<file>.py[:variant]`, each file a `get_config(variant)`.

Every file declares its variants in a module-level `VARIANTS` tuple (the first is the default)
and checks them with `check_variant`. Files import each other as `from configs import <file>`:
`moe_jax.commands.common` makes this folder the package `configs` from any working directory.
"""
from __future__ import annotations


def check_variant(variant: str, variants: tuple[str, ...]) -> None:
  """ValueError naming the choices when `variant` is not one of `variants`."""
  if variant not in variants:
    raise ValueError(f"config variant {variant!r} is unknown; use one of {', '.join(variants)}")
