"""One lazily importing name -> object registry, used for routers, models, decoders and tasks.

    MODELS = Registry("model.name", {"vit": "moe_jax.models.vit:ViT"})
    MODELS.register("my_vit", "my_pkg.models:MyViT")     # or an object itself
    cls = MODELS.get(config.name)                         # imported on first use

Entries are `"package.module:attribute"` strings (imported when first asked for, so registering
costs nothing and optional dependencies stay optional) or the objects themselves. A name that is
not registered may itself be a `"package.module:attribute"` string when `allow_paths` is set.
"""
from __future__ import annotations

import importlib
from typing import Any


class Registry:
  """Names -> objects for the config field `field` (named in every error)."""

  def __init__(self, field: str, entries: dict[str, Any] | None = None, *,
               allow_paths: bool = False):
    self.field = field
    self.allow_paths = allow_paths
    self._entries: dict[str, Any] = dict(entries or {})

  def register(self, name: str, target: Any, *, replace: bool = False) -> None:
    """Adds `name` -> `target` (an object or a `"module:attribute"` string)."""
    if name in self._entries and not replace:
      raise ValueError(f"{self.field}={name!r} is registered already; pass replace=True to "
                       "override it")
    self._entries[name] = target

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self):
    return iter(self.names())

  def get(self, name: str) -> Any:
    """The object registered as `name`, imported on first use; ValueError naming the field."""
    target = self._entries.get(name)
    if target is None:
      if not (self.allow_paths and ":" in name):
        hint = " or 'package.module:Attribute'" if self.allow_paths else ""
        raise ValueError(f"{self.field}={name!r} is unknown; use one of {self.names()}{hint}")
      target = name
    if isinstance(target, str):
      target = _import(target, self.field, name)
      if name in self._entries:
        self._entries[name] = target
    return target


def _import(path: str, field: str, name: str) -> Any:
  module, _, attribute = path.partition(":")
  try:
    return getattr(importlib.import_module(module), attribute)
  except (ImportError, AttributeError) as e:
    raise ValueError(f"{field}={name!r}: cannot import {path!r} ({e})") from e
