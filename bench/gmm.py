"""Grouped-matmul variants on CPU: which loop structure to use for the 'blocked' backend.

    python -m bench.gmm [--quick] [--out bench/out/gmm.json]

Rows `[P, K]` sorted by expert with every group padded to a multiple of `block`, weights
`[E, K, N]`; fwd and fwd+bwd (grads of lhs and rhs) of each variant vs one dense
`[tokens, K] x [K, N]` matmul over the real (unpadded) rows — what a perfect grouped GEMM would
cost — and optionally `jax.lax.ragged_dot`. Group sizes: `tokens` uniform random expert picks,
each count padded to a multiple of `block` as the dropless dispatcher does.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from moe_jax.moe import grouped_matmul


def _starts_ends(group_sizes, block):
  nb = group_sizes // block
  ends = jnp.cumsum(nb)
  return ends - nb, ends


def _block_expert(group_sizes, block, num_blocks):
  """Expert of every block (E past the total)."""
  ends = jnp.cumsum(group_sizes // block)
  return jnp.searchsorted(ends, jnp.arange(num_blocks), side="right").astype(jnp.int32)


# ---- forward variants: x [NB, b, K], rhs [E, K, N] -> [NB, b, N]; `t` = use rhs[e].T ----------

def fwd_nested_fori(x, rhs, gs, block, t):
  starts, ends = _starts_ends(gs, block)
  n = rhs.shape[1] if t else rhs.shape[2]

  def group(e, out):
    w = rhs[e]
    prod = (lambda a: a @ w.T) if t else (lambda a: a @ w)
    return jax.lax.fori_loop(starts[e], ends[e],
                             lambda j, o: o.at[j].set(prod(x[j])), out)

  return jax.lax.fori_loop(0, rhs.shape[0], group, jnp.zeros((x.shape[0], block, n), x.dtype))


def fwd_fori_gather(x, rhs, gs, block, t):
  """One loop over the used blocks; each block reads its expert's weights (a [K, N] slice)."""
  be = _block_expert(gs, block, x.shape[0])
  n = rhs.shape[1] if t else rhs.shape[2]

  def body(j, o):
    w = rhs[be[j]]
    return o.at[j].set(x[j] @ w.T if t else x[j] @ w)

  return jax.lax.fori_loop(0, jnp.sum(gs) // block, body,
                           jnp.zeros((x.shape[0], block, n), x.dtype))


def fwd_scan_gather(x, rhs, gs, block, t):
  """lax.scan over all blocks (static trip count); padding blocks skipped with lax.cond."""
  be = _block_expert(gs, block, x.shape[0])
  E = rhs.shape[0]
  n = rhs.shape[1] if t else rhs.shape[2]

  def body(_, xs):
    xj, e = xs
    y = jax.lax.cond(e < E, lambda: (xj @ rhs[e].T if t else xj @ rhs[e]),
                     lambda: jnp.zeros((block, n), x.dtype))
    return None, y

  return jax.lax.scan(body, None, (x, be))[1]


def fwd_nested_chunked(x, rhs, gs, block, t, chunk=4):
  """Nested loop, but the inner loop takes `chunk` blocks at a time (bigger matmuls)."""
  starts, ends = _starts_ends(gs, block)
  n = rhs.shape[1] if t else rhs.shape[2]
  NB = x.shape[0]

  def group(e, out):
    w = rhs[e]
    prod = (lambda a: a @ w.T) if t else (lambda a: a @ w)
    s, nb = starts[e], ends[e] - starts[e]
    n_chunks = nb // chunk

    def big(i, o):
      j = s + i * chunk
      xs = jax.lax.dynamic_slice_in_dim(x, j, chunk).reshape(chunk * block, -1)
      return jax.lax.dynamic_update_slice_in_dim(o, prod(xs).reshape(chunk, block, n), j, 0)

    out = jax.lax.fori_loop(0, n_chunks, big, out)
    return jax.lax.fori_loop(s + n_chunks * chunk, ends[e],
                             lambda j, o: o.at[j].set(prod(x[j])), out)

  del NB
  return jax.lax.fori_loop(0, rhs.shape[0], group, jnp.zeros((x.shape[0], block, n), x.dtype))


# ---- tgmm variants: x [NB, b, K], g [NB, b, N] -> [E, K, N] ---------------------------------

def tgmm_nested_fori(x, g, gs, block, E):
  starts, ends = _starts_ends(gs, block)

  def group(e, d):
    acc = jax.lax.fori_loop(starts[e], ends[e], lambda j, a: a + x[j].T @ g[j],
                            jnp.zeros((x.shape[2], g.shape[2]), x.dtype))
    return d.at[e].set(acc)

  return jax.lax.fori_loop(0, E, group, jnp.zeros((E, x.shape[2], g.shape[2]), x.dtype))


def tgmm_fori_gather(x, g, gs, block, E):
  be = _block_expert(gs, block, x.shape[0])

  def body(j, d):
    return d.at[be[j]].add(x[j].T @ g[j])

  return jax.lax.fori_loop(0, jnp.sum(gs) // block, body,
                           jnp.zeros((E, x.shape[2], g.shape[2]), x.dtype))


def tgmm_nested_chunked(x, g, gs, block, E, chunk=4):
  starts, ends = _starts_ends(gs, block)
  K, N = x.shape[2], g.shape[2]

  def group(e, d):
    s, nb = starts[e], ends[e] - starts[e]
    n_chunks = nb // chunk

    def big(i, a):
      j = s + i * chunk
      xs = jax.lax.dynamic_slice_in_dim(x, j, chunk).reshape(chunk * block, K)
      gg = jax.lax.dynamic_slice_in_dim(g, j, chunk).reshape(chunk * block, N)
      return a + xs.T @ gg

    acc = jax.lax.fori_loop(0, n_chunks, big, jnp.zeros((K, N), x.dtype))
    acc = jax.lax.fori_loop(s + n_chunks * chunk, ends[e], lambda j, a: a + x[j].T @ g[j], acc)
    return d.at[e].set(acc)

  return jax.lax.fori_loop(0, E, group, jnp.zeros((E, K, N), x.dtype))


def make_gmm(fwd_impl, tgmm_impl, block):
  @jax.custom_vjp
  def f(lhs, rhs, gs):
    x = lhs.reshape(-1, block, lhs.shape[1])
    return fwd_impl(x, rhs, gs, block, False).reshape(lhs.shape[0], rhs.shape[2])

  def f_fwd(lhs, rhs, gs):
    return f(lhs, rhs, gs), (lhs, rhs, gs)

  def f_bwd(res, d):
    lhs, rhs, gs = res
    g = d.reshape(-1, block, d.shape[1])
    x = lhs.reshape(-1, block, lhs.shape[1])
    d_lhs = fwd_impl(g, rhs, gs, block, True).reshape(lhs.shape)
    d_rhs = tgmm_impl(x, g, gs, block, rhs.shape[0])
    return d_lhs, d_rhs, None

  f.defvjp(f_fwd, f_bwd)
  return f


VARIANTS = {
    "nested fori, block tiles": (fwd_nested_fori, tgmm_nested_fori),
    "fori over blocks + weight gather": (fwd_fori_gather, tgmm_fori_gather),
    "scan over blocks + cond": (fwd_scan_gather, tgmm_fori_gather),
    "nested fori, 4-block chunks": (fwd_nested_chunked, tgmm_nested_chunked),
}


def group_sizes(rng, tokens, E, block):
  counts = np.bincount(rng.integers(0, E, tokens), minlength=E)
  padded = -(-counts // block) * block
  P = -(-(tokens + E * (block - 1)) // block) * block
  return jnp.asarray(padded, jnp.int32), P


def main():
  p = common.parser(__doc__.splitlines()[0], "bench/out/gmm.json")
  p.add_argument("--configs", nargs="+", default=None, help="tokens,E,block triples")
  p.add_argument("--ragged-dot", action="store_true",
                 help="also time jax.lax.ragged_dot (about E x dense; slow)")
  p.add_argument("--dtype", default="float32", help="operand dtype (bfloat16 on GPU/TPU)")
  args = common.parse(p)
  K, N = 768, 3072
  p_configs = args.configs or (["2048,32,16"] if args.quick else
                               ["2048,8,128", "2048,32,16", "8192,8,128", "8192,32,128",
                                "8192,32,16"])
  configs = [tuple(int(v) for v in c.split(",")) for c in p_configs]
  reps = args.reps or (3 if args.quick else 5)
  records = []
  rng = np.random.default_rng(0)
  for tokens, E, block in configs:
    gs, P = group_sizes(rng, tokens, E, block)
    lhs = jax.random.normal(jax.random.key(0), (P, K), args.dtype)
    rhs = (jax.random.normal(jax.random.key(1), (E, K, N)) * 0.02).astype(args.dtype)
    used = int(gs.sum())
    dense_lhs = lhs[:tokens]  # the real rows: padding counts against a variant
    w0 = rhs[0]
    fns = {
        "dense": (lambda l, w: l @ w, (dense_lhs, w0)),
        "ragged_dot": (lambda l, r: jax.lax.ragged_dot(l, r, gs), (lhs, rhs)),
        "library (tile ladder)": (lambda l, r: grouped_matmul.gmm(
            l, r, gs, backend="blocked", block_size=block), (lhs, rhs)),
    }
    for name, (fi, ti) in VARIANTS.items():
      g = make_gmm(fi, ti, block)
      fns[name] = (functools.partial(lambda g_, l, r: g_(l, r, gs), g), (lhs, rhs))
    if not args.ragged_dot:
      fns.pop("ragged_dot")  # ~E x dense: minutes per config
    for mode in ("fwd", "fwd+bwd"):
      compiled = {}
      for name, (f, a) in fns.items():
        if mode == "fwd+bwd":
          f = jax.grad(lambda *a_, f_=f: jnp.sum(f_(*a_) ** 2), argnums=(0, 1))
        compiled[name] = common.compile_fn(f, *a)
      timings = common.time_interleaved({n: c.call for n, c in compiled.items()}, reps=reps)
      base = timings["dense"].median
      base_min = min(timings["dense"].times)
      for name, c in compiled.items():
        records.append({"tokens": tokens, "E": E, "block": block, "rows": P, "used_rows": used,
                        "K": K, "N": N, "mode": mode, "variant": name,
                        "ratio_vs_dense": timings[name].median / base,
                        "min_ratio_vs_dense": min(timings[name].times) / base_min,
                        **timings[name].summary(), **c.stats()})
      common.print_table(
          [r for r in records if r["mode"] == mode and r["tokens"] == tokens and r["E"] == E
           and r["block"] == block],
          [("variant", "variant", ""), ("median_s", "median s", ".4f"),
           ("q1_s", "q1", ".4f"), ("q3_s", "q3", ".4f"), ("ratio_vs_dense", "x dense", ".2f"),
           ("min_ratio_vs_dense", "x dense (min)", ".2f"), ("temp_bytes", "temp", "bytes")],
          title=f"gmm {mode}: tokens={tokens} E={E} block={block} rows={P} used={used}")
  common.write_json(args.out, "gmm", args, records)


if __name__ == "__main__":
  main()
