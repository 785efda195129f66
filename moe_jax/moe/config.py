"""The MoE layer's configuration: every knob, its default, and build-time validation."""
from __future__ import annotations

import ml_collections

ROUTERS = ("top_k", "expert_choice", "soft", "clusters", "hash", "random")
TOKEN_CHOICE_ROUTERS = ("top_k", "clusters", "hash", "random")
DISPATCHES = ("capacity", "dropless")
ACTIVATIONS = ("gelu", "relu", "silu", "tanh")
LOSS_NAMES = ("importance", "load", "balance", "z_loss", "variance")

# Paper defaults of the auxiliary-loss weights, per router (SPECS.md).
_LOSS_WEIGHTS = {
    "top_k": dict(importance=0.005, load=0.005),  # V-MoE
    "clusters": dict(balance=0.01, variance=0.01),  # MoEC gate-loss weight 0.01
}


def default_config(router: str = "top_k") -> ml_collections.ConfigDict:
  """Returns the MoE layer config with every knob, loss weights set to `router`'s paper values."""
  if router not in ROUTERS:
    raise ValueError(f"router={router!r} is unknown; use one of {ROUTERS}")
  c = ml_collections.ConfigDict()
  c.num_experts = 8
  c.hidden_dim = 512  # F, hidden width of each expert MLP.
  c.activation = "gelu"
  c.dropout_rate = 0.0  # Dropout on the expert hidden layer (train only).
  c.dtype = "float32"  # Compute dtype of experts; params and router math stay float32.
  # Dispatch: `capacity` = [E, C, D] buffers, overflow dropped; `dropless` = grouped matmul.
  c.dispatch = "capacity"
  c.capacity_factor = 1.0  # C = ceil(K * S * capacity_factor / E); expert choice: round(cf*S/E).
  c.min_capacity = 1
  # Tokens per routing group S. 0 = each example (row of x [B, T, D]) is one group.
  c.group_size = 0
  # 'token' routes every token; 'image' routes whole rows of x [B, T, D] (images): groups of
  # images, capacity and BPR over images, each image carrying all its T tokens.
  c.granularity = "token"
  c.image_pooling = "mean"  # granularity='image': route by the 'mean' token or token 0 ('cls').
  c.images_per_group = 0  # granularity='image': images per routing group; 0 = each device's batch.
  c.dropless = ml_collections.ConfigDict()
  # Rows per block: each expert's tokens are padded to a multiple; also the blocked grouped
  # matmul's smallest tile. Small blocks waste few rows when experts get ~100 tokens each
  # (bench/RESULTS.md: 16 beat 128 at E=32 and matched it at E=8 on CPU).
  c.dropless.block_size = 16
  # 'auto' = 'ragged_dot' where XLA has a real grouped GEMM (TPU), else 'blocked'.
  c.dropless.backend = "auto"

  c.router = ml_collections.ConfigDict()
  c.router.name = router
  c.router.k = 1
  c.router.noise_std = 1.0  # V-MoE: eps ~ N(0, (noise_std / E)^2), train only.
  c.router.renormalize = False  # Renormalise the k selected weights to sum to 1.
  c.router.bpr = True  # Batch Prioritized Routing: serve tokens by max gate, 1st choices first.
  c.router.init_std = 0.02  # Router kernel init (normal).
  c.router.loss_weights = ml_collections.ConfigDict(
      {name: _LOSS_WEIGHTS.get(router, {}).get(name, 0.0) for name in LOSS_NAMES})
  c.router.soft = ml_collections.ConfigDict(dict(slots_per_expert=1))
  c.router.clusters = ml_collections.ConfigDict(dict(
      num_clusters=2,
      proj_dim=32,  # Router projection h = W x.
      temperature=0.07,  # Initial learnable temperature of the cosine logits.
      lambda_var=1.0,  # Weight of the cluster-variance term inside l_aux.
      expert_dropout=0.0,  # Cluster-level expert dropout rate (train only).
      resample_every=1,  # Steps between redraws of the dropped-expert mask.
  ))
  c.router.seed = 0  # Hash / random baselines: fixed seed (random router in eval mode).

  c.shared_expert = ml_collections.ConfigDict()
  c.shared_expert.enabled = False
  c.shared_expert.hidden_dim = 0  # 0 = same as hidden_dim.
  c.shared_expert.combine = "sum"  # 'sum': y = shared + routed; 'gate': sigmoid(x w) * shared.
  return c


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the offending field; called when a layer is built."""

  def fail(field: str, msg: str):
    raise ValueError(f"MoE config: {field} {msg}")

  r = c.router
  E = c.num_experts
  if r.name not in ROUTERS:
    fail("router.name", f"={r.name!r} is unknown; use one of {ROUTERS}")
  if c.dispatch not in DISPATCHES:
    fail("dispatch", f"={c.dispatch!r} is unknown; use one of {DISPATCHES}")
  if c.activation not in ACTIVATIONS:
    fail("activation", f"={c.activation!r} is unknown; use one of {ACTIVATIONS}")
  if not isinstance(E, int) or E < 1:
    fail("num_experts", f"={E!r} must be a positive integer")
  if c.hidden_dim < 1:
    fail("hidden_dim", f"={c.hidden_dim} must be >= 1")
  if r.name in TOKEN_CHOICE_ROUTERS and not 1 <= r.k <= E:
    fail("router.k", f"={r.k} must be in [1, num_experts={E}]")
  needs_capacity = (c.dispatch == "capacity" and r.name in TOKEN_CHOICE_ROUTERS) or (
      r.name == "expert_choice")
  if needs_capacity and not c.capacity_factor > 0:
    fail("capacity_factor", f"={c.capacity_factor} must be > 0 with dispatch='capacity' "
         "(or use dispatch='dropless')")
  if c.group_size < 0:
    fail("group_size", f"={c.group_size} must be >= 0 (0 = one group per example)")
  if c.granularity not in ("token", "image"):
    fail("granularity", f"={c.granularity!r} must be 'token' or 'image'")
  if c.image_pooling not in ("mean", "cls"):
    fail("image_pooling", f"={c.image_pooling!r} must be 'mean' or 'cls'")
  if c.images_per_group < 0:
    fail("images_per_group", f"={c.images_per_group} must be >= 0 (0 = each device's batch)")
  if c.granularity == "image" and (r.name not in TOKEN_CHOICE_ROUTERS or c.group_size != 0):
    fail("granularity", "='image' needs a token-choice router (top_k, clusters, hash, random) "
         "and group_size=0")
  if c.dispatch == "dropless" and r.name not in TOKEN_CHOICE_ROUTERS:
    fail("dispatch", f"='dropless' applies to token-choice routers; router.name={r.name!r} "
         "uses its own dispatch (set dispatch='capacity')")
  if c.dropless.block_size < 1:
    fail("dropless.block_size", f"={c.dropless.block_size} must be >= 1")
  if c.dropless.backend not in ("auto", "blocked", "ragged_dot"):
    fail("dropless.backend", f"={c.dropless.backend!r}: use 'auto', 'blocked' or 'ragged_dot'")
  if r.noise_std < 0:
    fail("router.noise_std", f"={r.noise_std} must be >= 0")
  if r.name == "soft" and r.soft.slots_per_expert < 1:
    fail("router.soft.slots_per_expert", f"={r.soft.slots_per_expert} must be >= 1")
  if r.name == "clusters":
    G = r.clusters.num_clusters
    if G < 1 or E % G:
      fail("router.clusters.num_clusters", f"={G} must divide num_experts={E}")
    if not 0.0 <= r.clusters.expert_dropout < 1.0:
      fail("router.clusters.expert_dropout", f"={r.clusters.expert_dropout} must be in [0, 1)")
    if r.clusters.resample_every < 1:
      fail("router.clusters.resample_every", f"={r.clusters.resample_every} must be >= 1")
    if r.clusters.expert_dropout > 0 and r.k > G:
      fail("router.k", f"={r.k} must be <= router.clusters.num_clusters={G} with expert dropout "
           "(only one expert per cluster is sure to survive)")
    if r.clusters.temperature <= 0:
      fail("router.clusters.temperature", f"={r.clusters.temperature} must be > 0")
  unknown = set(r.loss_weights) - set(LOSS_NAMES)
  if unknown:
    fail("router.loss_weights", f"has unknown names {sorted(unknown)}; known: {LOSS_NAMES}")
  if not 0.0 <= c.dropout_rate < 1.0:
    fail("dropout_rate", f"={c.dropout_rate} must be in [0, 1)")
  if c.dtype not in ("float32", "bfloat16", "float16"):
    fail("dtype", f"={c.dtype!r} must be float32, bfloat16 or float16")
  if c.shared_expert.combine not in ("sum", "gate"):
    fail("shared_expert.combine", f"={c.shared_expert.combine!r} must be 'sum' or 'gate'")
