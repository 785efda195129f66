"""moe_jax: sparse Mixture-of-Experts vision and vision-language models in JAX / Flax NNX.

Shape letters, fixed across every module's docstrings and code:

| letter | meaning |
|---|---|
| B | batch (examples, e.g. images) |
| T | tokens per example |
| D | model (token) width |
| F | hidden width of an expert MLP |
| E | experts |
| K | experts chosen per token (top-k) |
| C | capacity: token slots per expert and routing group |
| G | routing groups (the layer reshapes `[B, T, D]` to `[G, S, D]`) |
| S | tokens per routing group |
| P | slots per expert (Soft MoE) |

Packages (data flows top to bottom): `routing` (routers -> `RoutingPlan`), `moe` (the MoE layer),
`models`, `vlm` / `inr` (MoCHA, MoEC-INR), `parallel` (mesh, sharding, HLO inspection,
multi-host), `data`, `tasks` (one `Task` per problem), `train` (state, steps, loop, checkpoints),
`analysis`, `commands` (every entry point).
"""
