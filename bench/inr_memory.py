"""Peak memory and time of MoEC compression of a big real volume: one chunk vs 64^3 chunks.

    python -m bench.inr_memory [--quick] [--size 128] [--ratio 100] [--cases "one chunk,..."]
        [--out bench/out/inr_memory.json]

The volume is the MNI152 T1 template (197x233x189 uint8, a real MRI average shipped inside the
nilearn wheel), its centre crop of `--size`^3 voxels (`--size 256`: the template upsampled
trilinearly to 256^3 and stored as int16, the size of issue 19's scan). Each case runs in a
fresh subprocess, twice: `compress` (train every chunk, write the file, decode it once for the
report's PSNR / SSIM) and `decompress` (read the file, decode the whole volume, then a 32^3 ROI,
then the whole volume again warm). Reported: peak RSS of the process (`ru_maxrss`, JAX runtime
and compilation included), its RSS after imports and loading (`base`), the peak of Python /
numpy allocations (tracemalloc; XLA buffers are not in it), and times. The default allocator is
used (no THP re-run: huge pages would inflate RSS).
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

CASES = {  # name: config overrides
    "one chunk": ["chunk_shape=()"],
    "64^3 chunks x8": ["chunk_shape=(64,64,64)", "chunk_batch=8"],
    "64^3 chunks x2": ["chunk_shape=(64,64,64)", "chunk_batch=2"],
}


def mni_path() -> str:
  """The MNI152 2009a T1 template inside the installed nilearn wheel (197x233x189 uint8)."""
  try:
    import nilearn
  except ImportError:
    raise SystemExit("error: the MNI152 template ships in the nilearn wheel: pip install "
                     "nilearn==0.14.1 (or .[bench])") from None
  return os.path.join(os.path.dirname(nilearn.__file__), "datasets", "data",
                      "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def mni_volume(size: int):
  """Centre crop (size <= 189) or trilinear upsampling to int16 (size > 189) of MNI152 T1."""
  import numpy as np
  from scipy import ndimage
  from moe_jax.inr import volumes
  source = volumes.load(mni_path())
  data = source.data
  if size <= min(data.shape):
    start = [(n - size) // 2 for n in data.shape]
    data = data[tuple(slice(s, s + size) for s in start)]
  else:
    data = ndimage.zoom(data.astype(np.float32) * 16, [size / n for n in data.shape], order=1)
    data = np.rint(data).astype(np.int16)
  return volumes.Volume(np.ascontiguousarray(data), source.affine)


def _rss_mb() -> float:
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def _child(phase: str, case: str, size: int, ratio: float, steps: int, path: str) -> dict:
  from moe_jax.commands.common import load_config
  from moe_jax.inr import codec
  config = load_config("configs/inr_compress.py:moec", [
      *CASES[case], f"train.steps={steps}", "train.batch_size=4096", "train.log_every=0"])
  out = {"case": case, "phase": phase}
  if phase == "compress":
    volume = mni_volume(size)
    out["base_rss_mb"] = _rss_mb()
    tracemalloc.start()
    blob, report = codec.compress(volume, ratio, config)
    out["python_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    with open(path, "wb") as f:
      f.write(blob)
    out.update({k: report[k] for k in ("psnr", "ssim", "ratio_actual", "file_bytes", "chunks",
                                       "width", "train_s", "compress_s")})
  else:
    with open(path, "rb") as f:
      blob = f.read()
    out["base_rss_mb"] = _rss_mb()
    tracemalloc.start()
    for name, kw in (("decode_s", {}), ("roi32_decode_s", {"roi": (slice(48, 80),) * 3}),
                     ("decode_warm_s", {})):
      start = time.perf_counter()
      codec.decompress(blob, config.render_chunk, config.chunk_batch, **kw)
      out[name] = time.perf_counter() - start
    out["python_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
  out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return out


def main() -> None:
  from bench import common
  p = common.parser(__doc__.split("\n")[0], "bench/out/inr_memory.json")
  p.add_argument("--size", type=int, default=128, help="voxels per axis")
  p.add_argument("--ratio", type=float, default=100.0)
  p.add_argument("--steps", type=int, default=0, help="training steps per chunk (0: 300, "
                 "quick 30)")
  p.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of "
                 f"{', '.join(CASES)}")
  p.add_argument("--case", default="", help="internal: run one case in this process")
  p.add_argument("--phase", default="")
  p.add_argument("--file", default="")
  args = p.parse_args()  # default allocator: no THP re-run (see the docstring)
  steps = args.steps or (30 if args.quick else 300)
  if args.case:
    print(json.dumps(_child(args.phase, args.case, args.size, args.ratio, steps, args.file)))
    return
  records = []
  with tempfile.TemporaryDirectory() as tmp:
    for i, case in enumerate(args.cases.split(",")):
      if case not in CASES:
        raise SystemExit(f"error: --cases {case!r}: use some of {', '.join(CASES)}")
      path = os.path.join(tmp, f"{i}.moec")
      row = {"case": case}
      for phase in ("compress", "decompress"):
        cmd = [sys.executable, "-m", "bench.inr_memory", "--case", case, "--phase", phase,
               "--size", str(args.size), "--ratio", str(args.ratio), "--steps", str(steps),
               "--file", path]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        for k, v in result.items():
          if k not in ("case", "phase"):
            row[f"{phase[:3]}_{k}" if k.endswith("_mb") else k] = v
      records.append(row)
      print(row, flush=True)
  common.print_table(records, [
      ("case", "case", ""), ("chunks", "chunks", "d"), ("width", "H", "d"),
      ("ratio_actual", "ratio", ".1f"), ("psnr", "PSNR dB", ".2f"),
      ("com_base_rss_mb", "base MB", ".0f"), ("com_peak_rss_mb", "compress peak RSS MB", ".0f"),
      ("com_python_peak_mb", "numpy peak MB", ".1f"), ("compress_s", "compress s", ".1f"),
      ("dec_peak_rss_mb", "decode peak RSS MB", ".0f"), ("decode_s", "decode s", ".1f"),
      ("decode_warm_s", "warm decode s", ".1f"), ("roi32_decode_s", "32^3 ROI s", ".2f")],
      title=f"MoEC on MNI152 T1 {args.size}^3, {args.ratio:g}x, {steps} steps x 4096 points "
            "per chunk")
  common.write_json(args.out, "inr_memory", args, records,
                    {"size": args.size, "ratio": args.ratio, "steps": steps})


if __name__ == "__main__":
  main()
