"""Volume I/O: NIfTI (`.nii`, `.nii.gz`, via nibabel) and TIFF stacks (`.tif`, `.tiff`, tifffile).

A `Volume` is the voxel array in its stored dtype, in native byte order (NIfTI scaling not
applied: the raw values are what is compressed and written back), plus the NIfTI affine (None
for TIFF).
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np

NIFTI = (".nii", ".nii.gz")
TIFF = (".tif", ".tiff")


@dataclasses.dataclass
class Volume:
  data: np.ndarray  # [X, Y, Z] (or any ndim >= 2), stored dtype
  affine: np.ndarray | None = None  # [4, 4] voxel -> world (NIfTI), None for TIFF


def example_path(name: str = "anatomical.nii") -> str:
  """A real MRI volume shipped in the nibabel wheel: anatomical.nii [33, 41, 25] int16,
  example4d.nii.gz [128, 96, 24, 2] int16."""
  import nibabel
  return os.path.join(os.path.dirname(nibabel.__file__), "tests", "data", name)


def _kind(path: str) -> str:
  lower = path.lower()
  if lower.endswith(NIFTI):
    return "nifti"
  if lower.endswith(TIFF):
    return "tiff"
  raise ValueError(f"{path}: unknown volume format; use a NIfTI ({', '.join(NIFTI)}) or TIFF "
                   f"({', '.join(TIFF)}) file name")


def load(path: str) -> Volume:
  """Reads a NIfTI or TIFF volume; errors name the fix."""
  kind = _kind(path)
  if not os.path.isfile(path):
    raise ValueError(f"input volume {path!r} does not exist: check the path (the nibabel wheel "
                     f"ships one at {example_path()})")
  try:
    if kind == "nifti":
      import nibabel
      image = nibabel.load(path)
      data = np.asanyarray(image.dataobj.get_unscaled())
      affine = np.asarray(image.affine, np.float64)
    else:
      import tifffile
      data, affine = tifffile.imread(path), None
  except Exception as e:  # noqa: BLE001  (any reader failure is a bad input file)
    raise ValueError(f"cannot read {path!r} as {kind}: {e} (is the file complete and of that "
                     "format?)") from e
  if data.ndim < 2 or data.size < 2:
    raise ValueError(f"{path!r} holds an array of shape {data.shape}; need a volume with >= 2 "
                     "axes")
  if data.dtype.kind not in "iuf":
    raise ValueError(f"{path!r} has dtype {data.dtype}; only integer and float volumes are "
                     "supported")
  return Volume(np.asarray(data, data.dtype.newbyteorder("=")), affine)


def save(path: str, volume: Volume) -> None:
  """Writes `volume` as NIfTI (with its affine, identity if none) or TIFF, keeping the dtype."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if _kind(path) == "nifti":
    import nibabel
    affine = np.eye(4) if volume.affine is None else volume.affine
    image = nibabel.Nifti1Image(volume.data, affine)
    image.set_data_dtype(volume.data.dtype)
    nibabel.save(image, path)
  else:
    import tifffile
    tifffile.imwrite(path, volume.data)
