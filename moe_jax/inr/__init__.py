"""MoEC implicit neural compression (Zhao et al., arXiv 2312.01361) and INR baselines.

A volume is fitted by a coordinate network whose parameters are the compressed file:

    volumes.py   read / write NIfTI and TIFF volumes
    sampling.py  block layouts of voxel coordinates, grain pipeline of coordinate batches
    chunking.py  tiling into independently coded chunks; rendering a ROI / another resolution
    siren.py     stacked SIREN bank (per-member w0), runs under the core MoE dispatch
    model.py     MoEC (core router + SIREN experts) and BlockINR (fixed grid; 1 block = single INR)
    budget.py    width solver: parameters that fit original bytes / ratio
    fitting.py   training a batch of chunk models in one vmapped, jitted step
    fileformat.py, codec.py   the on-disk format; compress / decompress
    metrics.py, plot.py       PSNR / SSIM; PNG of the learned partition

The command is `python -m moe_jax.commands.inr compress|decompress`.
"""
