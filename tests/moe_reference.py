"""Slow, obviously-correct numpy references for MoE layers (per-token loops), shared by tests."""
from __future__ import annotations

import numpy as np


def gelu(x: np.ndarray) -> np.ndarray:
  """tanh-approximate GELU, as jax.nn.gelu's default."""
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def softmax(x: np.ndarray) -> np.ndarray:
  z = np.exp(x - x.max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def expert_params(layer) -> dict[str, np.ndarray]:
  """The expert bank's weights as float64 numpy arrays."""
  e = layer.experts
  return {k: np.asarray(getattr(e, k)[...], np.float64)
          for k in ("fc1_kernel", "fc1_bias", "fc2_kernel", "fc2_bias")}


def expert_ffn(p: dict[str, np.ndarray], e: int, x: np.ndarray) -> np.ndarray:
  """Expert e on one token `x [D]`."""
  return gelu(x @ p["fc1_kernel"][e] + p["fc1_bias"][e]) @ p["fc2_kernel"][e] + p["fc2_bias"][e]


def token_choice(x: np.ndarray, expert_index: np.ndarray, weights: np.ndarray,
                 priority: np.ndarray | None, capacity: int | None,
                 p: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
  """Per-token reference of a token-choice MoE on groups `x [G, S, D]`.

  Tokens are served choice by choice (all 1st choices first), within a choice by descending
  priority (ties: token order) or token order; a choice past `capacity` is dropped
  (`capacity=None`: dropless). Returns (y [G, S, D], kept [G, S, K] bool).
  """
  G, S, K = expert_index.shape
  y = np.zeros(x.shape, np.float64)
  kept = np.zeros((G, S, K), bool)
  for g in range(G):
    order = range(S) if priority is None else sorted(range(S), key=lambda t: -priority[g, t])
    used = {}
    for k in range(K):
      for t in order:
        e = int(expert_index[g, t, k])
        if capacity is not None and used.get(e, 0) >= capacity:
          continue
        used[e] = used.get(e, 0) + 1
        kept[g, t, k] = True
        y[g, t] += weights[g, t, k] * expert_ffn(p, e, x[g, t])
  return y, kept


def cv2(v: np.ndarray) -> float:
  return float(np.var(v) / np.mean(v) ** 2)
