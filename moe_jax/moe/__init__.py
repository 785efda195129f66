"""The MoE layer: `MoELayer(dim, config, rngs=...)`, `default_config()`, `capture_aux(model)`."""
from moe_jax.moe.aux_outputs import AuxOutputs, LayerAux, capture_aux
from moe_jax.moe.config import default_config, validate
from moe_jax.moe.layer import MoELayer

__all__ = ["MoELayer", "default_config", "validate", "capture_aux", "AuxOutputs", "LayerAux"]
