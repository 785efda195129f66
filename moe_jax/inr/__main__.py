"""`python -m moe_jax.inr compress ...` / `... decompress ...` (see moe_jax.inr.cli)."""
from moe_jax.inr.cli import main

main()
