"""PNG plots of a routing report: class x expert heatmaps, expert loads, specialisation curve.
Written through `etils.epath` (`moe_jax.paths.workdir_path`), so the folder may be a cloud URI
such as gs://bucket/run/analysis."""
from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from moe_jax import paths  # noqa: E402


def short_name(name: str) -> str:
  return name.replace("blocks/", "block ").replace("/mlp", "")


def save_png(fig, path: str | os.PathLike) -> str:
  """Writes `fig` as a PNG to `path` (local or a cloud URI), closes it; returns the path."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=80)
  plt.close(fig)
  out = paths.workdir_path(path)
  out.write_bytes(buffer.getvalue())
  return os.fspath(out)


def plot_report(report: dict, out_dir: str | os.PathLike) -> list[str]:
  """Writes heatmaps.png, load.png and specialisation.png into `out_dir` (local or a cloud URI);
  returns their paths."""
  out_dir = paths.workdir_path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  layers = report["layers"]
  names = list(layers)
  written = []

  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), squeeze=False)
  for ax, name in zip(axes[0], names):
    m = np.asarray(layers[name]["class_expert"])
    m = m / np.maximum(m.sum(1, keepdims=True), 1e-30)  # P(expert | class)
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set(title=f"{short_name(name)}\nnMI={layers[name]['normalized_mi']:.2f}", xlabel="expert",
           ylabel="class")
  fig.colorbar(im, ax=axes[0].tolist(), label="P(expert | class)")
  written.append(save_png(fig, out_dir / "heatmaps.png"))

  fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
  for ax, name in zip(axes[0], names):
    load = np.asarray(layers[name]["load"])
    ax.bar(np.arange(len(load)), load)
    ax.axhline(1 / max(len(load), 1), color="k", lw=0.8, ls="--")
    ax.set(title=short_name(name), xlabel="expert", ylabel="fraction of assignments")
  fig.tight_layout()
  written.append(save_png(fig, out_dir / "load.png"))

  fig, ax = plt.subplots(figsize=(4.5, 3))
  ax.plot(range(len(names)), [layers[n]["normalized_mi"] for n in names], "o-")
  ax.axhline(report["threshold"], color="r", lw=0.8, ls="--", label="make-dense threshold")
  ax.set_xticks(range(len(names)), [short_name(n) for n in names], rotation=30)
  ax.set(ylabel="normalised MI(class; expert)", ylim=(0, 1), title="specialisation per layer")
  ax.legend()
  fig.tight_layout()
  written.append(save_png(fig, out_dir / "specialisation.png"))
  return written
