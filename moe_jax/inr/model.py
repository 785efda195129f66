"""INR models of a volume: MoEC (learned partition), BlockINR (fixed grid; 1 block = single INR)
and TreeINR (TINC's octree of chained per-node SIRENs).

Both map coordinate groups `[G, N, d]` (d = the volume's ndim, coordinates in [-1, 1]) to
intensities `[G, N]`. A MoEC group is one routing group; a BlockINR or TreeINR group is one block,
in the block's own local coordinates.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from moe_jax import moe
from moe_jax.moe import aux_outputs, dispatch
from moe_jax.routing import RoutingPlan, build_router
from moe_jax.inr.siren import SirenBank

KINDS = ("moec", "blocks", "octree")
GATES = ("linear", "mlp")


def model_config(kind: str = "moec") -> ml_collections.ConfigDict:
  """Every knob of an INR model (its defaults are what a compressed file's header omits)."""
  if kind not in KINDS:
    raise ValueError(f"model.kind={kind!r} is unknown; use one of {KINDS}")
  c = ml_collections.ConfigDict()
  c.kind = kind
  c.width = 0  # H, hidden width; 0 = solved from the compression ratio (budget.py).
  c.tail_width = 0  # width of the last sine layer (fine budget knob); 0 = solved with width.
  # Sine layers after the first: moec = per expert (H -> H); blocks = hidden layers of each INR.
  c.depth = 2
  c.encoder_depth = 1  # moec: sine layers of the shared encoder (d -> H, then H -> H)
  c.w0_first = 30.0  # frequency of the coordinate layer (moec encoder, each block's first layer)
  c.w0_hidden = 30.0  # blocks' hidden layers and the moec decoder's sine layer
  c.w0_expert = (22.5, 45.0)  # moec: expert i has w0 = base + step * i (Zhao et al.)
  # moec: what the router sees: 'features' (shared encoder output, Zhao et al.) or 'coords'
  # (a linear gate on coordinates: top-1 cells are convex polytopes, a spatially coherent split).
  c.gate_input = "features"
  # moec: the gating network before the router's top-k: 'linear' (the core router's linear layer
  # alone) or 'mlp' (the paper's gating MLP: gate_depth ReLU layers of gate_width, then the
  # router's linear layer; Zhao et al. gate an MLP on the encoder features).
  c.gate = "linear"
  c.gate_depth = 1
  c.gate_width = 0  # 0 = the model width H
  c.grid = (1, 1, 1)  # blocks: blocks per axis (all ones = a single INR); one entry per axis
  if kind == "octree":  # TreeINR (TINC): levels below the root; 2^(d * levels) leaf blocks
    c.levels = 1
  moe_cfg = moe.default_config("top_k")
  moe_cfg.num_experts = 4
  moe_cfg.hidden_dim = 1  # unused: the experts are SIRENs (SirenBank), not MLPs
  moe_cfg.dispatch = "dropless"
  moe_cfg.dropless.block_size = 64
  moe_cfg.dropless.backend = "blocked"
  moe_cfg.router.k = 1
  moe_cfg.router.noise_std = 0.0
  c.moe = moe_cfg
  return c


def _check_widths(c: ml_collections.ConfigDict) -> None:
  if c.width < 1 or c.tail_width < 1:
    raise ValueError(f"model.width={c.width} / model.tail_width={c.tail_width} must be >= 1 "
                     "(0 means 'solve from the ratio': call budget.solve_widths first)")
  if c.depth < 1:
    raise ValueError(f"model.depth={c.depth} must be >= 1")


def _gate_layers(c: ml_collections.ConfigDict, gate_dim: int, rngs: nnx.Rngs) -> list[nnx.Linear]:
  """The hidden layers of the gating MLP (`gate_dim` -> gate_width, ReLU); none for 'linear'."""
  if c.gate not in GATES:
    raise ValueError(f"model.gate={c.gate!r}: use one of {GATES}")
  if c.gate == "linear":
    return []
  if c.gate_depth < 1 or c.gate_width < 0:
    raise ValueError(f"model.gate_depth={c.gate_depth} must be >= 1 and model.gate_width="
                     f"{c.gate_width} >= 0 (0 = the model width) for model.gate='mlp'")
  width = c.gate_width or c.width
  dims = [gate_dim] + [width] * c.gate_depth
  return [nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])]


class MoEC(nnx.Module):
  """Gated mixture of SIREN experts (Zhao et al., arXiv 2312.01361).

  coords `[G, N, d]` -> shared encoder (sine d -> H, encoder_depth-1 sine H -> H) -> gate (on
  the encoder features or, with gate_input='coords', on the coordinates; gate='mlp': the paper's
  gating MLP, gate_depth ReLU layers, before the router) -> core router (top-k over E) ->
  expert SIRENs (depth sine layers H -> H, expert i at w0 = base + step*i) run by the core
  token-choice dispatch (`model.moe.dispatch`: dropless = exactly the routed (token, expert)
  pairs; capacity = buffers, overflow dropped) -> combine -> shared decoder (sine H -> tail,
  linear -> 1). Router aux losses leave through `moe_jax.moe.capture_aux`.
  """

  def __init__(self, c: ml_collections.ConfigDict, in_dim: int, *, rngs: nnx.Rngs):
    _check_widths(c)
    moe.validate(c.moe)
    self.moe_config = ml_collections.FrozenConfigDict(c.moe)
    E, H = c.moe.num_experts, c.width
    base, step = c.w0_expert
    if c.encoder_depth < 1:
      raise ValueError(f"model.encoder_depth={c.encoder_depth} must be >= 1")
    self.encoder = SirenBank(1, [in_dim] + [H] * c.encoder_depth, [c.w0_first], first=True,
                             rngs=rngs)
    if c.gate_input not in ("features", "coords"):
      raise ValueError(f"model.gate_input={c.gate_input!r}: use 'features' or 'coords'")
    self.gate_on_coords = c.gate_input == "coords"
    gate_dim = in_dim if self.gate_on_coords else H
    self.gate_mlp = nnx.List(_gate_layers(c, gate_dim, rngs))
    self.router = build_router((c.gate_width or H) if self.gate_mlp else gate_dim, c.moe,
                               rngs=rngs)
    if self.router.plan_kind != "token_choice":
      raise ValueError(f"model.moe.router.name={c.moe.router.name!r} makes "
                       f"{self.router.plan_kind} plans: MoEC needs a token-choice router")
    self.experts = SirenBank(E, [H] * (c.depth + 1), [base + step * i for i in range(E)],
                             first=False, rngs=rngs)
    self.decoder = SirenBank(1, [H, c.tail_width], [c.w0_hidden], first=False, out_dim=1,
                             rngs=rngs)

  def route(self, coords: jax.Array) -> tuple[jax.Array, RoutingPlan]:
    """`coords [G, N, d]` -> encoder features `[G, N, H]` and the routing plan over `[G, N]`."""
    G, N, d = coords.shape
    features = self.encoder(coords.reshape(1, G * N, d)).reshape(G, N, -1)
    gate = coords if self.gate_on_coords else features
    for layer in self.gate_mlp:
      gate = jax.nn.relu(layer(gate))
    return features, self.router(gate)

  def __call__(self, coords: jax.Array) -> jax.Array:
    """`coords [G, N, d] -> [G, N]`."""
    c = self.moe_config
    features, plan = self.route(coords)
    mixed, metrics = dispatch.token_choice(
        plan, features, self.experts, mode=c.dispatch, capacity_factor=c.capacity_factor,
        min_capacity=c.min_capacity, block_size=c.dropless.block_size,
        backend=c.dropless.backend)
    G, N, H = mixed.shape
    y = self.decoder(mixed.reshape(1, G * N, H)).reshape(G, N)
    weights = c.router.loss_weights
    weighted = sum((weights[name] * v for name, v in plan.aux_losses.items()),
                   jnp.zeros((), jnp.float32))
    mass = plan.token_expert_mass(N).sum(axis=1)
    aux_outputs.record(self, aux_outputs.LayerAux(
        losses=plan.aux_losses, weighted_loss=weighted, metrics={**plan.metrics, **metrics},
        example_load=mass / jnp.maximum(mass.sum(-1, keepdims=True), 1e-9)))
    return y

  def expert_of(self, coords: jax.Array) -> jax.Array:
    """The first-choice expert of each point: `coords [G, N, d] -> int32 [G, N]`."""
    return self.route(coords)[1].expert_index[..., 0]


def block_grid(c: ml_collections.ConfigDict, in_dim: int) -> tuple[int, ...]:
  """Blocks per axis of a BlockINR (`model.grid`) or of a TreeINR's leaves (2^levels)."""
  grid = tuple(c.grid) if c.kind == "blocks" else (2 ** c.levels,) * in_dim
  if len(grid) != in_dim or min(grid) < 1:
    raise ValueError(f"model.grid={grid} needs one positive entry per volume axis ({in_dim})")
  return grid


class BlockINR(nnx.Module):
  """Independent SIRENs, one per block of a fixed grid (TINC's block-wise baseline).

  Block b sees only its own points, in local coordinates: `coords [G = blocks, N, d] -> [G, N]`.
  Each SIREN: sine d -> H (w0_first), depth-1 sine H -> H, sine H -> tail (w0_hidden), linear
  -> 1. A grid of all ones is the single-INR baseline.
  """

  def __init__(self, c: ml_collections.ConfigDict, in_dim: int, *, rngs: nnx.Rngs):
    _check_widths(c)
    H, blocks = c.width, math.prod(block_grid(c, in_dim))
    self.first = SirenBank(blocks, [in_dim, H], [c.w0_first] * blocks, first=True, rngs=rngs)
    self.rest = SirenBank(blocks, [H] * c.depth + [c.tail_width], [c.w0_hidden] * blocks,
                          first=False, out_dim=1, rngs=rngs)

  def __call__(self, coords: jax.Array) -> jax.Array:
    """`coords [G, N, d] -> [G, N]`."""
    return self.rest(self.first(coords))[..., 0]


def _depth_first_order(levels: int, in_dim: int) -> tuple[int, ...]:
  """Blocks of the `(2^levels,) * in_dim` grid (C order) listed depth-first through the octree,
  children of a node in C order of their corners: the leaves under one node are contiguous."""
  blocks = np.stack(np.unravel_index(np.arange(2 ** (in_dim * levels)), (2 ** levels,) * in_dim))
  key = np.zeros(blocks.shape[1], np.int64)
  for level in range(levels):  # the child digit (one bit per axis) at each depth
    bits = (blocks >> (levels - 1 - level)) & 1  # [d, G]
    digit = sum(bits[k] << (in_dim - 1 - k) for k in range(in_dim))
    key = key * 2 ** in_dim + digit
  return tuple(int(i) for i in np.argsort(key))


class TreeINR(nnx.Module):
  """Tree-structured INR (TINC: Yang et al., CVPR 2023; as RichealYoung/TINC utils/OctTree.py).

  A full octree, `levels` below the root, cuts the volume into `2^levels` blocks per axis; every
  node owns a SIREN and a leaf's network is the chain of its ancestors' networks: the root maps
  coordinates local to the block (the same for every leaf) to features, each node below maps its
  parent's features on, and the leaf outputs the value. Nodes near the root are shared by many
  blocks (hierarchical parameter sharing). Layers as TINC's default `level_info`: root sine
  d -> H -> H, inner nodes sine H -> H -> H, leaves sine H -> H -> T, linear -> 1.
  `coords [G = leaves, N, d] -> [G, N]`, leaves in the grid's C order.

  Simplified: one width H at every level (TINC splits the budget by per-level ratios, its default
  1 : 0.8 : 1.5 per node, about what equal widths give), equal allocation inside a level (TINC's
  default leaf allocation weighs nodes by their count of non-zero voxels), our width solver and
  training loop; TINC's weighted loss is not used.
  """

  def __init__(self, c: ml_collections.ConfigDict, in_dim: int, *, rngs: nnx.Rngs):
    _check_widths(c)
    if c.levels < 1:
      raise ValueError(f"model.levels={c.levels} must be >= 1 (a root alone is the single INR)")
    H, fan = c.width, 2 ** in_dim
    self.levels, self.fan, self.order = c.levels, fan, _depth_first_order(c.levels, in_dim)
    banks = [SirenBank(1, [in_dim, H, H], [c.w0_first], first=True, rngs=rngs)]
    for level in range(1, c.levels):
      banks.append(SirenBank(fan ** level, [H, H, H], [c.w0_hidden] * fan ** level, first=False,
                             rngs=rngs))
    banks.append(SirenBank(fan ** c.levels, [H, H, c.tail_width], [c.w0_hidden] * fan ** c.levels,
                           first=False, out_dim=1, rngs=rngs))
    self.banks = nnx.List(banks)

  def __call__(self, coords: jax.Array) -> jax.Array:
    """`coords [G, N, d] -> [G, N]`."""
    G, N, d = coords.shape
    order = np.asarray(self.order)
    h = coords[order].reshape(1, G * N, d)  # depth-first: a node's leaves are contiguous
    for level, bank in enumerate(self.banks):
      h = bank(h.reshape(self.fan ** level, -1, h.shape[-1]))
    return h.reshape(G, N)[np.argsort(order)]


def build(c: ml_collections.ConfigDict, in_dim: int, *, rngs: nnx.Rngs
          ) -> MoEC | BlockINR | TreeINR:
  """The model named by `c.kind` for `in_dim`-dimensional coordinates."""
  if c.kind not in KINDS:
    raise ValueError(f"model.kind={c.kind!r} is unknown; use one of {KINDS}")
  return {"moec": MoEC, "blocks": BlockINR, "octree": TreeINR}[c.kind](c, in_dim, rngs=rngs)


def num_params(c: ml_collections.ConfigDict, in_dim: int) -> int:
  """Parameter count of the model `c` describes (abstract build: nothing is allocated)."""
  abstract = nnx.eval_shape(lambda: build(c, in_dim, rngs=nnx.Rngs(0)))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
