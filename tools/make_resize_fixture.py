"""Writes tests/data/posemb_resize_torch.npz: torch's `interpolate` (bicubic and bilinear,
align_corners=False, antialias=False, as HF ViT / DINOv2 `interpolate_pos_encoding`) of random
position-embedding grids, up and down, for `init_from.resize_posemb` (tests/test_init_from.py).

    /work/venv-convert/bin/python tools/make_resize_fixture.py
"""
import os

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "posemb_resize_torch.npz")
CASES = [(4, 7), (7, 4), (5, 5), (16, 28)]  # grid in -> grid out


def main() -> None:
  rng = np.random.default_rng(0)
  arrays = {}
  for g, h in CASES:
    grid = rng.normal(size=(g, g, 3)).astype(np.float32)
    arrays[f"in_{g}_{h}"] = grid
    x = torch.from_numpy(grid).permute(2, 0, 1)[None]  # [1, D, g, g], as HF
    for mode in ("bicubic", "bilinear"):
      y = torch.nn.functional.interpolate(x, size=(h, h), mode=mode, align_corners=False,
                                          antialias=False)
      arrays[f"{mode}_{g}_{h}"] = y[0].permute(1, 2, 0).numpy()
  np.savez(OUT, **arrays)
  print(f"wrote {OUT}: {sorted(arrays)}")


if __name__ == "__main__":
  main()
