"""MoEC implicit neural compression (Zhao et al., arXiv 2312.01361) and INR baselines.

A volume is fitted by a coordinate network whose parameters are the compressed file:

    volumes.py   read / write NIfTI and TIFF volumes with their metadata (scaling, spacing)
    sampling.py  block layouts of voxel coordinates, random training points drawn on the device
    chunking.py  tiling into independently coded chunks; rendering a ROI / another resolution
    siren.py     stacked SIREN bank (per-member w0), runs under the core MoE dispatch
    model.py     MoEC (core router + SIREN experts; linear or MLP gate), BlockINR (fixed grid;
                 1 block = single INR), TreeINR (TINC's octree of chained per-node SIRENs)
    budget.py    width solver, the re-solve to a coded byte budget, the PSNR-target search
    quantise.py  uniform 2-8-bit codes of the parameters (per tensor or per output channel)
    fitting.py   training a batch of chunk models: a vmapped step, K steps per jitted scan
    fileformat.py, codec.py   the on-disk format; compress / decompress
    metrics.py, plot.py       PSNR / SSIM; PNG of the learned partition
    classical.py spline / JPEG 2000 / JPEG XL baselines at a byte budget (bench/inr.py)

The command is `python -m moe_jax.commands.inr compress|decompress`.
"""
