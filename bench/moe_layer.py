"""MoE layer fwd+bwd time per router/dispatch path, relative to a dense FFN of equal active FLOPs.

    python -m bench.moe_layer [--quick] [--out bench/out/moe_layer.json]
    python -m bench.moe_layer --sections default --tokens 4096 --experts 8 32 \
        --out bench/out/moe_layer_default.json

For every (tokens T, experts E, top-k k) the dense baseline is a GELU MLP `D -> k*F -> D` (the
same matmul FLOPs per token as k experts of width F) measured in the same interleaved rounds as
the MoE paths, so ratios are robust to the drift of a shared machine. Tokens come as images of
`--seq` tokens (`x [T/seq, seq, D]`); `group_size=0` routes each image as one group.

Sections:
- ratios: time / dense for each path (token-choice routers: capacity with and without BPR over
  group sizes, dropless over block sizes; expert-choice / soft routers: their own dispatch).
- memory: compiled temp bytes per path at T and 2T (compile only), and the growth factor, for
  the whole layer and for its dispatch alone (identity experts).
- overhead: routing share at the largest T: the same layer with the experts replaced by the
  identity, timed in the same rounds as the real layer.
- default: the layer as `moe.default_config()` builds it (top_k, k=1, capacity, cf 1.0, BPR),
  `jax.grad` of `sum(layer(x))` w.r.t. parameters and x, against the plain dense FFN
  `sum(gelu(x @ W1) @ W2)` on `x [T, D]` (grads of x, W1, W2), the same on `x [T/seq, seq, D]`,
  and the `ratios` section's `DenseFFN`; then the "full" layer (train-mode router noise, aux
  losses in the loss, metrics returned) with each of BPR, noise, aux losses and metrics switched
  off one at a time; and the layer and the plain dense FFN under `sum(f(x)^2) / 2` (the output is
  read, as in a train step; a loss linear in the output never reads it). All in the same interleaved rounds;
  ratios per round to the plain dense FFN under the same loss.
- ops: the default layer's parts compiled and timed apart (routing + dispatch with identity
  experts, the expert bank on its buffers, dense vs batched GEMMs, fresh E-sized gradient
  buffers), to say where its time goes.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from moe_jax import moe
from moe_jax.moe import experts as experts_module
from moe_jax.moe.experts import ExpertBank
from moe_jax.routing import ROUTERS

D, F = 768, 3072


@dataclasses.dataclass(frozen=True)
class Path:
  """One router/dispatch configuration of the layer."""
  router: str
  dispatch: str = "capacity"
  bpr: bool = True
  group_size: int = 0
  block_size: int = 16
  capacity_factor: float = 1.0

  @property
  def token_choice(self) -> bool:
    return ROUTERS.get(self.router).plan_kind == "token_choice"

  @property
  def name(self) -> str:
    if not self.token_choice:
      return f"{self.router} cf{self.capacity_factor:g} g{self.group_size}"
    if self.dispatch == "dropless":
      return f"{self.router} dropless b{self.block_size}"
    bpr = "+bpr" if self.bpr and self.router == "top_k" else ""
    return f"{self.router} capacity{bpr} cf{self.capacity_factor:g} g{self.group_size}"

  @property
  def kind(self) -> str:
    """Family for the best-of tables: capacity / dropless / the router's own dispatch."""
    if not self.token_choice:
      return self.router
    return self.dispatch if self.router == "top_k" else f"{self.router}/{self.dispatch}"


def layer_config(path: Path, E: int, k: int, dtype: str = "float32"):
  c = moe.default_config(path.router)
  c.dtype = dtype
  c.num_experts, c.hidden_dim = E, F
  if path.token_choice:
    c.router.k = k
  if "bpr" in c.router:
    c.router.bpr = path.bpr
  c.dispatch, c.capacity_factor, c.group_size = path.dispatch, path.capacity_factor, path.group_size
  c.dropless.block_size = path.block_size
  return c


def _loss_and_grad(model, x):
  """`jax.jit`-able fwd+bwd: grads of sum(y * ct) + aux loss w.r.t. params and x."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  ct = jax.random.normal(jax.random.key(7), x.shape, x.dtype)

  def loss(params, rest, x):
    m = nnx.merge(graphdef, params, rest)
    if isinstance(m, moe.MoELayer):
      y, aux = moe.capture_aux(m)(x)
      return jnp.sum(y * ct) + aux.total_loss
    return jnp.sum(m(x) * ct)

  fn = lambda params, rest, x: jax.value_and_grad(loss, argnums=(0, 2))(params, rest, x)
  return fn, (params, rest, x)


class DenseFFN(nnx.Module):
  def __init__(self, dim: int, hidden: int, dtype: str, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, rngs=rngs)
    self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.gelu(self.fc1(x)))


@contextlib.contextmanager
def identity_experts():
  """Experts replaced by the identity: what is left is routing + dispatch + combine."""
  call, grouped = ExpertBank.__call__, ExpertBank.grouped
  scaled = lambda self, x, w: x.astype(self.dtype) * (1 if w is None else w[..., None])
  ExpertBank.__call__ = lambda self, x, row_weights=None: scaled(self, x, row_weights)
  ExpertBank.grouped = lambda self, x, group_sizes, backend, block_size, row_weights=None: (
      scaled(self, x, row_weights))
  try:
    yield
  finally:
    ExpertBank.__call__, ExpertBank.grouped = call, grouped


def build(path: Path | None, T: int, E: int, k: int, seq: int, identity: bool = False,
          dtype: str = "float32"):
  """Compiled fwd+bwd of a layer on `x [T/seq, seq, D]` (path None = the dense baseline), its
  matmuls in `dtype` (float32 parameters)."""
  x = jax.random.normal(jax.random.key(1), (T // seq, seq, D), jnp.float32)
  if path is None:
    model = DenseFFN(D, k * F, dtype, nnx.Rngs(0))
  else:
    model = moe.MoELayer(D, layer_config(path, E, k, dtype), rngs=nnx.Rngs(0))
    model.eval()  # no router noise (one [T, E] normal sample; its key would be traced state)
  fn, args = _loss_and_grad(model, x)
  with identity_experts() if identity else contextlib.nullcontext():
    return common.compile_fn(fn, *args)


def token_choice_paths(router: str, T: int, E: int, k: int, group_sizes, blocks) -> list[Path]:
  gs = sorted({g for g in group_sizes if g == 0 or (g <= T and T % g == 0)})
  paths = [Path(router, "capacity", True, g) for g in gs]
  if router == "top_k":
    paths += [Path(router, "capacity", False, g) for g in gs[:1]]
  paths += [Path(router, "dropless", block_size=b) for b in blocks]
  return paths


def all_paths(T, E, k, args) -> list[Path]:
  """The paths of `args.routers` (default: every registered router)."""
  paths = []
  for router in args.routers or ROUTERS.names():
    if Path(router).token_choice:
      paths += token_choice_paths(router, T, E, k, args.group_sizes, args.blocks)
    else:  # expert choice, soft and anything new: its own dispatch; k is not used
      paths.append(Path(router, group_size=args.group_sizes[0]))
  return paths


def try_build(path, *a, **kw):
  try:
    return build(path, *a, **kw), None
  except Exception as e:  # noqa: BLE001  (a router under construction must not stop the run)
    return None, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def run_ratios(args, records, configs, seq, reps, budget_s):
  for T, E, k in configs:
    paths = all_paths(T, E, k, args)
    compiled: dict[str, Any] = {"dense": build(None, T, E, k, seq, dtype=args.dtype)}
    meta = {"dense": None}
    for p in paths:
      c, err = try_build(p, T, E, k, seq, dtype=args.dtype)
      if err:
        records.append({"section": "ratios", "T": T, "E": E, "k": k, "path": p.name,
                        "error": err})
        print(f"  skip {p.name}: {err}", flush=True)
        continue
      compiled[p.name], meta[p.name] = c, p
    overhead = args.overhead and T == max(args.tokens)
    if overhead:
      for p in paths:
        if p.name in compiled:
          c, err = try_build(p, T, E, k, seq, identity=True, dtype=args.dtype)
          if c is not None:
            compiled["identity: " + p.name], meta["identity: " + p.name] = c, p
    t0 = time.perf_counter()
    timings = common.time_interleaved({n: c.call for n, c in compiled.items()}, reps=reps,
                                      budget_s=budget_s)
    dense = timings["dense"].median
    rows = []
    for name, c in compiled.items():
      p = meta[name]
      identity = name.startswith("identity: ")
      rec = {"section": "overhead" if identity else "ratios", "T": T, "E": E, "k": k, "D": D,
             "F": F, "seq": seq, "path": name,
             "kind": "dense" if p is None else p.kind,
             **({} if p is None else dataclasses.asdict(p)),
             "ratio_vs_dense": timings[name].median / dense, **timings[name].summary(),
             **c.stats()}
      if identity:
        full = timings[name[len("identity: "):]].median
        rec["routing_share"] = timings[name].median / full
      records.append(rec)
      rows.append(rec)
    common.print_table(rows, [
        ("path", "path", ""), ("median_s", "median s", ".3f"), ("q1_s", "q1", ".3f"),
        ("q3_s", "q3", ".3f"), ("n", "n", "d"), ("ratio_vs_dense", "x dense", ".2f"),
        ("routing_share", "routing share", ".1%"), ("temp_bytes", "temp", "bytes"),
        ("flops", "XLA flops", ".3g")],
        title=f"T={T} E={E} k={k} D={D} F={F} (timed {time.perf_counter() - t0:.0f}s)")


def run_memory(args, records, configs, seq):
  """Compiled temp bytes at T and 2T of the whole layer and of its dispatch alone (the same
  layer with identity experts: routing, row assignment, gathers and combine)."""
  for T, E, k in configs:
    rows = []
    for p in [None] + all_paths(T, E, k, args):
      rec = {"section": "memory", "T": T, "E": E, "k": k, "seq": seq,
             "path": "dense" if p is None else p.name}
      for key, identity in (("", False), ("dispatch_", True)):
        if identity and p is None:
          continue
        temps = []
        for t in (T, 2 * T):
          c, _ = (build(None, t, E, k, seq, dtype=args.dtype), None) if p is None else \
              try_build(p, t, E, k, seq, identity=identity, dtype=args.dtype)
          temps.append(None if c is None else c.temp_bytes)
        rec.update({f"{key}temp_T": temps[0], f"{key}temp_2T": temps[1],
                    f"{key}growth": None if None in temps or not temps[0]
                    else temps[1] / temps[0]})
      records.append(rec)
      rows.append(rec)
    common.print_table(rows, [("path", "path", ""), ("temp_T", f"layer T={T}", "bytes"),
                              ("temp_2T", f"layer T={2 * T}", "bytes"),
                              ("growth", "growth", ".2f"),
                              ("dispatch_temp_T", f"dispatch T={T}", "bytes"),
                              ("dispatch_temp_2T", f"dispatch T={2 * T}", "bytes"),
                              ("dispatch_growth", "growth", ".2f")],
                       title=f"compiled temp memory (fwd+bwd), E={E} k={k}; dispatch = the "
                             "layer with identity experts")


@dataclasses.dataclass(frozen=True)
class Variant:
  """The default-config top_k layer with some of its parts switched on or off."""
  name: str
  bpr: bool = True
  train: bool = False  # router noise
  aux_loss: bool = False  # aux.total_loss added to the loss (capture_aux)
  metrics: bool = False  # routing metrics and example loads returned (capture_aux)
  squared: bool = False  # loss sum(layer(x)^2) / 2: the output is read, as in a train step
  autodiff_fc2: bool = False  # the code before issue 22's fix (see `autodiff_weighted_fc2`)


FULL = dict(train=True, aux_loss=True, metrics=True)
VARIANTS = (
    Variant("layer (eval, sum(layer(x)))"),
    Variant("layer (eval), BPR off", bpr=False),
    Variant("full: noise + aux loss + metrics", **FULL),
    Variant("full - BPR", **{**FULL, "bpr": False}),
    Variant("full - noise (eval)", **{**FULL, "train": False}),
    Variant("full - aux losses", **{**FULL, "aux_loss": False}),
    Variant("full - metrics", **{**FULL, "metrics": False}),
    Variant("layer (eval), sum(layer(x)^2) / 2", squared=True),
    Variant("before: layer (eval), autodiff fc2", autodiff_fc2=True),
    Variant("before: layer (eval), autodiff fc2, sum(layer(x)^2) / 2", squared=True,
            autodiff_fc2=True),
)


@contextlib.contextmanager
def autodiff_weighted_fc2():
  """The expert bank's weighted fc2 differentiated by autodiff, as before issue 22's fix: the
  combine weights' gradient `<dL/dy, h W2 + b2>` reads the forward fc2 output."""
  custom = experts_module.weighted_linear
  experts_module.weighted_linear = lambda grouping, h, kernel, bias, w, group_sizes: (
      w[..., None] * (experts_module._matmul(grouping, h, kernel, group_sizes) + bias))
  try:
    yield
  finally:
    experts_module.weighted_linear = custom


def _loss(squared: bool):
  """`sum(y)`, or `sum(y^2) / 2`, which reads y (a loss linear in y, as `sum(ct * y)`, does not:
  XLA then drops the forward of the last GEMM)."""
  return (lambda y: 0.5 * jnp.sum(y * y)) if squared else jnp.sum


def build_plain_dense(T: int, seq: int | None, squared: bool = False):
  """`jax.grad` of `sum(gelu(x @ W1) @ W2)` (or of `_loss(squared)` of it) w.r.t. x, W1, W2;
  x `[T, D]` (or `[T/seq, seq, D]`)."""
  x = jax.random.normal(jax.random.key(1), (T, D) if seq is None else (T // seq, seq, D))
  w1 = jax.random.normal(jax.random.key(2), (D, F)) * D**-0.5
  w2 = jax.random.normal(jax.random.key(3), (F, D)) * F**-0.5
  loss = _loss(squared)
  fn = jax.grad(lambda x, w1, w2: loss(nnx.gelu(x @ w1) @ w2), argnums=(0, 1, 2))
  return common.compile_fn(fn, x, w1, w2)


def build_variant(v: Variant, T: int, E: int, seq: int):
  """`jax.grad` of `sum(layer(x))` (+ aux loss) w.r.t. parameters and `x [T/seq, seq, D]`."""
  model = moe.MoELayer(D, layer_config(Path("top_k", bpr=v.bpr), E, 1), rngs=nnx.Rngs(0))
  model.train() if v.train else model.eval()
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (T // seq, seq, D), jnp.float32)
  output_loss = _loss(v.squared)

  def fn(params, rest, x):
    def loss(params, x):
      m = nnx.merge(graphdef, params, rest, copy=True)  # rest (router key) is not differentiated
      if not (v.aux_loss or v.metrics):
        return output_loss(m(x)), {}
      y, aux = moe.capture_aux(m)(x)
      metrics = {name: (a.metrics, a.example_load) for name, a in aux.layers.items()}
      return jnp.sum(y) + (aux.total_loss if v.aux_loss else 0.0), metrics if v.metrics else {}

    return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

  with autodiff_weighted_fc2() if v.autodiff_fc2 else contextlib.nullcontext():
    return common.compile_fn(fn, params, rest, x)


def run_default(args, records, seq, reps, budget_s):
  """The default-config layer, its parts one at a time, and four dense baselines."""
  sum_dense, squared_dense = ("dense: sum(gelu(x @ W1) @ W2), x [T, D]",
                              "dense: sum((gelu(x @ W1) @ W2)^2) / 2, x [T, D]")
  for T, E in itertools.product(sorted(args.tokens), args.experts):
    compiled = {sum_dense: build_plain_dense(T, None),
                f"dense: same, x [T/{seq}, {seq}, D]": build_plain_dense(T, seq),
                "dense: DenseFFN (ratios section)": build(None, T, E, 1, seq, dtype=args.dtype),
                squared_dense: build_plain_dense(T, None, squared=True)}
    for v in VARIANTS:
      compiled[v.name] = build_variant(v, T, E, seq)
    t0 = time.perf_counter()
    timings = common.time_interleaved({n: c.call for n, c in compiled.items()}, reps=reps,
                                      budget_s=budget_s)
    rows = []
    for name, c in compiled.items():
      t, base = timings[name], timings[squared_dense if "^2" in name else sum_dense]
      per_round = [a / b for a, b in zip(t.times, base.times)]
      rec = {"section": "default", "T": T, "E": E, "k": 1, "D": D, "F": F, "seq": seq,
             "path": name, "ratio_vs_dense": t.median / base.median,
             "round_ratio_median": float(np.median(per_round)),
             "round_ratio_min": min(per_round), "round_ratio_max": max(per_round),
             **t.summary(), **c.stats()}
      records.append(rec)
      rows.append(rec)
    common.print_table(rows, [
        ("path", "path", ""), ("median_s", "median s", ".3f"), ("min_s", "min", ".3f"),
        ("max_s", "max", ".3f"), ("n", "n", "d"), ("ratio_vs_dense", "x dense", ".2f"),
        ("round_ratio_median", "per-round median", ".2f"),
        ("round_ratio_min", "per-round min", ".2f"),
        ("round_ratio_max", "per-round max", ".2f"), ("flops", "XLA flops", ".3g"),
        ("temp_bytes", "temp", "bytes")],
        title=f"default config, T={T} E={E} k=1 D={D} F={F}, x dense = median / median of the "
              f"plain dense FFN under the same loss (sum, or sum(.^2) / 2 for the rows saying ^2) "
              f"(timed {time.perf_counter() - t0:.0f}s)")


def _expert_buffers(T: int, E: int):
  """Capacity buffers of the default layer (one group per image of 256, cf 1): `[E, T/E, D]`."""
  x = jax.random.normal(jax.random.key(1), (E, T // E, D), jnp.float32)
  return x, *nnx.split(ExpertBank(E, D, F, rngs=nnx.Rngs(0)), nnx.Param, ...)


def build_ops(T: int, E: int, seq: int) -> dict[str, common.Compiled]:
  """The default layer's fwd+bwd (sum loss) cut into separately compiled parts, each with the
  shapes the layer gives it: routing + dispatch + combine (identity experts), the expert bank
  alone on its `[E, T/E, D]` buffers (with row weights), its GEMMs, and the cost of E-sized
  fresh gradient buffers; next to the plain dense FFN and its GEMMs."""
  x, graphdef, params, rest = _expert_buffers(T, E)
  w = jnp.full(x.shape[:2], 0.5)

  def bank_grad(params, x, w):
    loss = lambda params, x, w: jnp.sum(nnx.merge(graphdef, params, rest, copy=True)(x, w))
    return jax.grad(loss, argnums=(0, 1, 2))(params, x, w)

  k = iter(jax.random.split(jax.random.key(3), 8))
  r = lambda *shape: jax.random.normal(next(k), shape, jnp.float32)
  xd, w1, hd = r(T, D), r(D, F), r(T, F)
  xe, w1e, he = r(E, T // E, D), r(E, D, F), r(E, T // E, F)
  zeros = lambda n: common.compile_fn(
      lambda s: (jnp.full((n, D, F), s), jnp.full((n, F, D), s)), jnp.float32(0))
  return {
      "dense FFN: sum loss, grads of x, W1, W2": build_plain_dense(T, None),
      "layer: sum loss, grads of params and x": build_variant(VARIANTS[0], T, E, seq),
      "layer, identity experts (routing, dispatch, combine)": build(
          Path("top_k"), T, E, 1, seq, identity=True),
      f"expert bank alone on [E, {T // E}, D] buffers": common.compile_fn(bank_grad, params, x, w),
      "GEMM dense [T, D] x [D, F]": common.compile_fn(jnp.matmul, xd, w1),
      f"GEMM batched [E, {T // E}, D] x [E, D, F]": common.compile_fn(
          lambda a, b: jnp.einsum("ecd,edf->ecf", a, b), xe, w1e),
      "weight-grad GEMM dense [T, D]^T [T, F]": common.compile_fn(
          lambda a, b: jnp.einsum("td,tf->df", a, b), xd, hd),
      "weight-grad GEMM batched -> [E, D, F]": common.compile_fn(
          lambda a, b: jnp.einsum("ecd,ecf->edf", a, b), xe, he),
      "fresh W1 + W2 sized outputs (fill), dense": zeros(1),
      "fresh W1 + W2 sized outputs (fill), E experts": zeros(E),
  }


def run_ops(args, records, seq, reps, budget_s):
  """Times `build_ops`'s parts in interleaved rounds; ratios per round to the dense FFN."""
  for T, E in itertools.product(sorted(args.tokens), args.experts):
    compiled = build_ops(T, E, seq)
    t0 = time.perf_counter()
    timings = common.time_interleaved({n: c.call for n, c in compiled.items()}, reps=reps,
                                      budget_s=budget_s)
    base = timings[next(iter(compiled))]
    rows = []
    for name, c in compiled.items():
      t = timings[name]
      per_round = [a / b for a, b in zip(t.times, base.times)]
      rec = {"section": "ops", "T": T, "E": E, "k": 1, "D": D, "F": F, "seq": seq,
             "path": name, "round_ratio_median": float(np.median(per_round)),
             "round_ratio_min": min(per_round), "round_ratio_max": max(per_round),
             **t.summary(), **c.stats()}
      records.append(rec)
      rows.append(rec)
    common.print_table(rows, [
        ("path", "part", ""), ("median_s", "median s", ".3f"), ("min_s", "min", ".3f"),
        ("max_s", "max", ".3f"), ("n", "n", "d"),
        ("round_ratio_median", "x dense FFN (per-round median)", ".2f"),
        ("round_ratio_min", "min", ".2f"), ("round_ratio_max", "max", ".2f"),
        ("flops", "XLA flops", ".3g"), ("out_bytes", "output", "bytes")],
        title=f"default layer cut into parts, T={T} E={E} k=1 D={D} F={F} "
              f"(timed {time.perf_counter() - t0:.0f}s)")


def main():
  p = common.parser(__doc__.splitlines()[0], "bench/out/moe_layer.json")
  p.add_argument("--tokens", type=int, nargs="+", default=None)
  p.add_argument("--experts", type=int, nargs="+", default=None)
  p.add_argument("--k", type=int, nargs="+", default=None)
  p.add_argument("--group-sizes", type=int, nargs="+", default=None)
  p.add_argument("--blocks", type=int, nargs="+", default=None)
  p.add_argument("--routers", nargs="+", choices=ROUTERS.names(), default=None,
                 help="default: every registered router (--quick: top_k, expert_choice, soft)")
  p.add_argument("--dtype", default="float32", help="matmul dtype (bfloat16 on GPU/TPU)")
  p.add_argument("--seq", type=int, default=256, help="tokens per image (group_size=0 group)")
  p.add_argument("--budget", type=float, default=None, help="seconds of timed rounds per config")
  p.add_argument("--sections", nargs="+", default=["ratios", "memory"],
                 choices=["ratios", "memory", "default", "ops"])
  p.add_argument("--no-overhead", dest="overhead", action="store_false")
  args = common.parse(p)
  if args.quick:
    args.tokens = args.tokens or [2048]
    args.experts = args.experts or [8, 32]
    args.k = args.k or [1]
    args.group_sizes = args.group_sizes or [0]
    args.blocks = args.blocks or [16]
    args.routers = args.routers or ["top_k", "expert_choice", "soft"]
    reps, budget = args.reps or 3, args.budget or 20.0
  else:
    args.tokens = args.tokens or [2048, 4096, 8192]
    args.experts = args.experts or [8, 32]
    args.k = args.k or [1, 2]
    args.group_sizes = args.group_sizes or [0, 1024, 4096]
    args.blocks = args.blocks or [16, 128]
    reps, budget = args.reps or 5, args.budget or 40.0
  configs = list(itertools.product(sorted(args.tokens), args.experts, args.k))
  records: list[dict] = []
  start = time.perf_counter()
  if "ratios" in args.sections:
    run_ratios(args, records, configs, args.seq, reps, budget)
  if "default" in args.sections:
    run_default(args, records, args.seq, reps, budget)
  if "ops" in args.sections:
    run_ops(args, records, args.seq, reps, budget)
  if "memory" in args.sections:
    memory_configs = [c for c in configs if c[0] == min(args.tokens)]
    run_memory(args, records, memory_configs[-1:] if args.quick else memory_configs, args.seq)
  print(f"total {time.perf_counter() - start:.0f}s", flush=True)
  common.write_json(args.out, "moe_layer", args, records)


if __name__ == "__main__":
  main()
