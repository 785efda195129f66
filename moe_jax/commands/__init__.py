"""The command-line entry points, each `python -m moe_jax.commands.<name>` with a `main()`.

    train     train a config into a workdir, resuming (`python train.py` runs it)
    eval      evaluate a workdir's latest checkpoint (`python eval.py` runs it)
    aot       compile a train step ahead of time for a device topology, from this host
    compare   train one model under several routing strategies and compare them in one table
    analysis  print and redraw the routing analysis of an eval_<name>.json
    inr       MoEC neural compression of volumes: compress | decompress

`common` holds what they share: config loading, flag parsing, one-line errors naming the fix.
Library modules parse no arguments.
"""
