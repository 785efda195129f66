"""Routing statistics of MoE layers: class x expert matrices, specialisation, recommendations.

Two class x expert matrices per layer, summed over the whole evaluation set:

- `class_expert [classes, E]`: per example, the share of its routing mass on each expert.
- `class_token_expert [classes, E + 1]`: tokens (per-image routing: images) counted by their
  main expert (`RoutingPlan.primary_expert`; the last column: tokens no expert took).

Specialisation is the mutual information between class and expert under `P(c, e) = M / sum(M)`,
normalised by the class entropy (1 = the expert determines the class; 0 = routing ignores the
class), computed on the token matrix. The example-mass matrix is 0 by construction for expert
choice with one routing group per example (every expert takes exactly C tokens of every
example), so it is reported (`example_normalized_mi`) but never drives a recommendation. Layers
whose token-level normalised MI stays below `threshold` route without regard to the class:
candidates to make dense (Han et al. 2024 find shallow MoE layers route unreliably).

Loads: `load` is the router's assignment share per expert before capacity drops (router
imbalance); `kept_load` the share of kept (token, choice) pairs after capacity (token choice).
"""
from __future__ import annotations

import numpy as np


def class_expert_matrix(labels: np.ndarray, example_load: np.ndarray, num_classes: int,
                        mask: np.ndarray | None = None) -> np.ndarray:
  """`labels [N]`, `example_load [N, E]` (rows sum to 1) -> `[num_classes, E]` summed mass."""
  weights = np.ones(len(labels)) if mask is None else np.asarray(mask, np.float64)
  one_hot = np.eye(num_classes)[np.asarray(labels)] * weights[:, None]
  return one_hot.T @ np.asarray(example_load, np.float64)


def _entropy(p: np.ndarray, axis=None) -> np.ndarray:
  p = np.asarray(p, np.float64)
  return -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=axis)


def specialisation(matrix: np.ndarray) -> dict[str, float]:
  """Mutual information (nats) between class and expert, and normalised scores."""
  joint = np.asarray(matrix, np.float64) / max(float(np.sum(matrix)), 1e-30)
  p_class, p_expert = joint.sum(1), joint.sum(0)
  h_class, h_expert, h_joint = _entropy(p_class), _entropy(p_expert), _entropy(joint)
  mi = max(h_class + h_expert - h_joint, 0.0)
  conditional = joint / np.maximum(p_class[:, None], 1e-30)  # P(e | c)
  E = matrix.shape[1]
  return {"mutual_information": float(mi),
          "normalized_mi": float(mi / h_class) if h_class > 0 else 0.0,
          "expert_entropy_per_class": float(np.sum(p_class * _entropy(conditional, axis=1))
                                            / np.log(E)) if E > 1 else 0.0}


def _summary(load) -> dict:
  load = np.asarray(load, np.float64)
  return {"values": load.tolist(),
          "cv": float(np.std(load) / np.mean(load)) if load.size and np.mean(load) else 0.0}


def layer_report(class_expert: dict[str, np.ndarray], metrics: dict[str, dict[str, float]],
                 threshold: float = 0.1,
                 class_token_expert: dict[str, np.ndarray] | None = None) -> dict:
  """Per-layer statistics + the layers recommended to be made dense.

  Args:
    class_expert: layer -> `[classes, E]` routing-mass matrix.
    metrics: layer -> routing metrics averaged over the evaluation (load, dropped_fraction, ...).
    threshold: normalised MI under which a layer is a candidate to make dense.
    class_token_expert: layer -> `[classes, E + 1]` main-expert token counts; the specialisation
      score (without it, the routing-mass matrix is used).
  """
  layers = {}
  for name, matrix in class_expert.items():
    m = metrics.get(name, {})
    tokens = None if class_token_expert is None else class_token_expert.get(name)
    load, kept = _summary(m.get("load", [])), _summary(m.get("kept_load", []))
    layers[name] = {**specialisation(matrix if tokens is None else tokens),
                    **{k: float(v) if np.ndim(v) == 0 else np.asarray(v).tolist()
                       for k, v in m.items()},
                    "example_normalized_mi": specialisation(matrix)["normalized_mi"],
                    "load": load["values"], "load_cv": load["cv"],
                    "class_expert": np.asarray(matrix).tolist()}
    if "kept_load" in m:
      layers[name].update(kept_load=kept["values"], kept_load_cv=kept["cv"])
    if tokens is not None:
      layers[name]["class_token_expert"] = np.asarray(tokens).tolist()
  dense = [n for n, r in layers.items() if r["normalized_mi"] < threshold]
  return {"layers": layers, "threshold": threshold, "recommend_dense": dense}


def summary(report: dict) -> str:
  """One line per MoE layer of a `layer_report` (specialisation, load CV, drop rate) and the
  layers it recommends to make dense."""
  lines = [f"{'layer':<16} {'spec. (nMI)':>11} {'load CV':>8} {'dropped':>8}"]
  for name, layer in report["layers"].items():
    dropped = layer.get("dropped_fraction")
    lines.append(f"{name:<16} {layer['normalized_mi']:>11.3f} {layer['load_cv']:>8.3f} "
                 f"{'-' if dropped is None else f'{dropped:.4f}':>8}")
  lines.append(f"could be dense (nMI < {report['threshold']}): "
               f"{', '.join(report['recommend_dense']) or 'none'}")
  return "\n".join(lines)
