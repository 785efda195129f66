"""KV-cached vs full-recompute generation for a small LLaMA-style decoder behind a visual prefix.

    python -m bench.generation [--quick] [--out bench/out/generation.json]

`moe_jax.vlm.generation.generate` (one prefill, then one-token steps over a preallocated cache)
against `generate_without_cache` (the whole prefix + text through the decoder every step), both
compiled, greedy, prompts of mixed lengths; they return the same tokens (checked here). Times are
interleaved medians (spread: q1-q3) per `steps` tokens generated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from bench import common
from moe_jax.vlm import generation, llama


def main():
  p = common.parser(__doc__.splitlines()[0], "bench/out/generation.json")
  args = common.parse(p)
  width, depth, prefix_len, steps = (128, 2, 64, 8) if args.quick else (256, 4, 256, 24)
  reps = args.reps or (3 if args.quick else 5)
  c = llama.llama_config(width=width, depth=depth, mlp_dim=2 * width, num_heads=8,
                         num_kv_heads=2, vocab_size=1024, max_len=1024)
  decoder = llama.Llama(c, rngs=nnx.Rngs(0))
  B, L = 4, 48
  prefix = jax.random.normal(jax.random.key(0), (B, prefix_len, width))
  tokens = jax.random.randint(jax.random.key(1), (B, L), 0, 1024)
  prompt_len = jnp.array([8, 24, 16, 12])
  graphdef, state = nnx.split(decoder)
  fns = {name: common.compile_fn(
      lambda s, p, t, n, f=f: f(nnx.merge(graphdef, s), p, t, n, steps),
      state, prefix, tokens, prompt_len)
      for name, f in (("cached", generation.generate),
                      ("full recompute", generation.generate_without_cache))}
  same = np.array_equal(fns["cached"].call(), fns["full recompute"].call())
  timings = common.time_interleaved({n: f.call for n, f in fns.items()}, reps=reps)
  base = timings["full recompute"].median
  records = [{"variant": n, "batch": B, "prefix": prefix_len, "text_len": L, "steps": steps,
              "width": width, "depth": depth, "same_tokens": same,
              "speedup_vs_full": base / timings[n].median, **timings[n].summary(),
              "compile_s": fns[n].compile_s} for n in fns]  # (XLA's flops count a loop once)
  common.print_table(records, [
      ("variant", "variant", ""), ("median_s", "median s", ".4f"), ("q1_s", "q1", ".4f"),
      ("q3_s", "q3", ".4f"), ("speedup_vs_full", "x full recompute", ".2f"),
      ("compile_s", "compile s", ".1f"), ("same_tokens", "same tokens", "")],
      title=f"generation: LLaMA width {width} depth {depth}, batch {B}, prefix {prefix_len}, "
            f"text {L}, {steps} steps")
  common.write_json(args.out, "generation", args, records)


if __name__ == "__main__":
  main()
