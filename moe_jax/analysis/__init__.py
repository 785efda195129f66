"""Routing analysis: statistics per MoE layer, plots, and routing-strategy comparison."""
from moe_jax.analysis.routing import class_expert_matrix, layer_report, specialisation

__all__ = ["class_expert_matrix", "specialisation", "layer_report"]
