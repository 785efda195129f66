"""Volume I/O: NIfTI (`.nii`, `.nii.gz`, via nibabel) and TIFF stacks (`.tif`, `.tiff`, tifffile).

A `Volume` is the voxel array in its stored dtype, in native byte order (the raw values are what
is compressed and written back), the NIfTI affine (None for TIFF), and `meta`: what the format
carries besides the voxels, kept through compress -> decompress:
- NIfTI: every NIfTI-1 header field that differs from nibabel's default header, as
  `nifti.<field>` (scl_slope / scl_inter, qform / sform codes and matrices, pixdim, xyzt_units,
  descrip, intent, ...): float fields as 1-D float32 arrays without their trailing default
  entries, integer fields as ints (arrays as int64), text as bytes. Where the sform rows equal
  the qform's affine (float32, the usual case) they are left out and `nifti_sform_is_qform` set. The shape / dtype
  fields (dim, datatype, bitpix, vox_offset, sizeof_hdr, magic) come from the data.
- TIFF: `tiff.flavour` (imagej, ome or plain), the X / Y resolution tags and their unit; ImageJ
  z spacing and unit; OME physical sizes (X, Y, Z) and units.
`physical(volume)` applies the NIfTI scaling (what PSNR / SSIM are measured on).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

NIFTI = (".nii", ".nii.gz")
TIFF = (".tif", ".tiff")
# Set from the data when a NIfTI file is written, so not kept in `meta`.
_NIFTI_STRUCTURAL = ("sizeof_hdr", "dim", "datatype", "bitpix", "vox_offset", "magic")
_TIFF_AXES = {2: "YX", 3: "ZYX", 4: "TZYX"}
SFORM_IS_QFORM = "nifti_sform_is_qform"  # meta flag: srow_* left out, equal to the qform's rows


@dataclasses.dataclass
class Volume:
  data: np.ndarray  # [X, Y, Z] (or any ndim >= 2), stored dtype
  affine: np.ndarray | None = None  # [4, 4] voxel -> world (NIfTI), None for TIFF
  meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # format fields (above)


def physical(volume: Volume) -> np.ndarray:
  """Physical values: NIfTI `data * scl_slope + scl_inter` (float64) where the header scales
  (slope finite and non-zero, as nibabel reads it), else the stored values."""
  slope = float(np.asarray(volume.meta.get("nifti.scl_slope", np.nan)).reshape(-1)[0])
  if not np.isfinite(slope) or slope == 0:
    return volume.data
  inter = float(np.asarray(volume.meta.get("nifti.scl_inter", 0.0)).reshape(-1)[0])
  return volume.data * slope + (inter if np.isfinite(inter) else 0.0)


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


def _nifti_meta(header) -> dict[str, Any]:
  """`nifti.<field>` of every non-structural field that differs from the default header."""
  import nibabel
  default, meta = nibabel.Nifti1Header(), {}
  for name in default.keys():
    if name in _NIFTI_STRUCTURAL or name not in header:
      continue
    value, base = np.asarray(header[name]), np.asarray(default[name])
    value = value.astype(value.dtype.newbyteorder("="))
    if value.dtype.kind == "S":
      if value.item() != base.item():
        meta[f"nifti.{name}"] = bytes(value.item())
      continue
    if value.dtype.kind == "f" and value.dtype != np.float32:  # NIfTI-2 float64 fields
      value = value.astype(np.float32)
    same = (value == base) | (np.isnan(value) & np.isnan(base)) if value.dtype.kind == "f" \
        else value == base
    if not np.all(same):
      if value.ndim:  # trailing entries equal to the default are left out
        value = value[:int(np.flatnonzero(~same)[-1]) + 1]
      meta[f"nifti.{name}"] = value.reshape(-1) if value.dtype.kind == "f" else (
          value.astype(np.int64) if value.ndim else int(value))
  return meta


def _tiff_meta(tif) -> dict[str, Any]:
  """Resolution tags of the first page; ImageJ spacing / unit; OME physical sizes / units."""
  tags, meta = tif.pages[0].tags, {}
  meta["tiff.flavour"] = "imagej" if tif.is_imagej else "ome" if tif.is_ome else "plain"
  for tag, key in (("XResolution", "tiff.x_resolution"), ("YResolution", "tiff.y_resolution")):
    if tag in tags:
      meta[key] = np.asarray(tags[tag].value, np.int64)
  if "ResolutionUnit" in tags:
    meta["tiff.resolution_unit"] = int(tags["ResolutionUnit"].value)
  if tif.is_imagej:
    ij = tif.imagej_metadata or {}
    if "spacing" in ij:
      meta["tiff.spacing"] = float(ij["spacing"])
    if "unit" in ij:
      meta["tiff.unit"] = str(ij["unit"])
  elif tif.is_ome:
    import tifffile
    pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]
    pixels = (pixels[0] if isinstance(pixels, list) else pixels)["Pixels"]
    meta["tiff.physical_size"] = np.array(
        [float(pixels.get(f"PhysicalSize{a}", np.nan)) for a in "XYZ"], np.float64)
    meta["tiff.physical_unit"] = [str(pixels.get(f"PhysicalSize{a}Unit", "")) for a in "XYZ"]
  return meta


def load(path: str) -> Volume:
  """Reads a NIfTI or TIFF volume with its metadata; errors name the fix."""
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
      meta = _nifti_meta(image.header)
      meta.pop("nifti.scl_slope", None), meta.pop("nifti.scl_inter", None)
      sform, qform = (np.asarray(m, np.float32) for m in (image.header.get_sform(),
                                                           image.header.get_qform()))
      if image.header["sform_code"] > 0 and np.array_equal(sform, qform):
        for axis in "xyz":  # the sform rows are the qform's: rebuilt from it when written
          meta.pop(f"nifti.srow_{axis}", None)
        meta[SFORM_IS_QFORM] = True
      slope, inter = image.dataobj.slope, image.dataobj.inter  # nibabel moved them here
      if slope != 1 or inter != 0:
        meta["nifti.scl_slope"] = np.array([slope], np.float32)
        meta["nifti.scl_inter"] = np.array([inter], np.float32)
    else:
      import tifffile
      with tifffile.TiffFile(path) as tif:
        data, affine, meta = tif.asarray(), None, _tiff_meta(tif)
  except Exception as e:  # noqa: BLE001  (any reader failure is a bad input file)
    raise ValueError(f"cannot read {path!r} as {kind}: {e} (is the file complete and of that "
                     "format?)") from e
  if data.ndim < 2 or data.size < 2:
    raise ValueError(f"{path!r} holds an array of shape {data.shape}; need a volume with >= 2 "
                     "axes")
  if data.dtype.kind not in "iuf":
    raise ValueError(f"{path!r} has dtype {data.dtype}; only integer and float volumes are "
                     "supported")
  return Volume(np.asarray(data, data.dtype.newbyteorder("=")), affine, meta)


def nifti_header(volume: Volume):
  """The `nibabel.Nifti1Header` of `volume`: its `nifti.*` fields over the default header, the
  data's shape and dtype; the affine as sform / qform (code 1) where `meta` has none."""
  import nibabel
  header = nibabel.Nifti1Header()
  header.set_data_shape(volume.data.shape)
  header.set_data_dtype(volume.data.dtype)
  fields = {k[len("nifti."):]: v for k, v in volume.meta.items() if k.startswith("nifti.")}
  sform_is_qform = bool(volume.meta.get(SFORM_IS_QFORM, False))
  if not {"sform_code", "qform_code"} & set(fields):
    affine = np.eye(4) if volume.affine is None else volume.affine
    header.set_sform(affine, 1)
    header.set_qform(affine, 1)
  for name, value in fields.items():
    if name in _NIFTI_STRUCTURAL or name not in header:
      raise ValueError(f"metadata field nifti.{name} is not a NIfTI-1 header field the codec "
                       "keeps; the file is damaged")
    value, full = np.asarray(value).reshape(-1), np.array(header[name])
    if full.ndim:  # array fields: the stored leading entries over the default
      full[:value.size] = value[:full.size]
      header[name] = full
    else:
      header[name] = value[0] if value.size else full
  if sform_is_qform:
    rows = np.asarray(header.get_qform(), np.float32)
    for i, axis in enumerate("xyz"):
      header[f"srow_{axis}"] = rows[i]
  return header


def save(path: str, volume: Volume) -> None:
  """Writes `volume` as NIfTI (its header fields, affine identity if none) or TIFF (its
  resolution, ImageJ / OME metadata), keeping the dtype and the stored (unscaled) values."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  if _kind(path) == "nifti":
    import nibabel
    header = nifti_header(volume)
    image = nibabel.Nifti1Image(volume.data, None, header)
    # nibabel writes the array as stored values when the header's scaling is set explicitly.
    image.header.set_slope_inter(*header.get_slope_inter())
    nibabel.save(image, path)
    return
  import tifffile
  meta, kw = volume.meta, {}
  if "tiff.x_resolution" in meta and "tiff.y_resolution" in meta:
    kw["resolution"] = (tuple(int(x) for x in meta["tiff.x_resolution"]),
                        tuple(int(x) for x in meta["tiff.y_resolution"]))
  flavour = meta.get("tiff.flavour", "plain")
  axes = _TIFF_AXES.get(volume.data.ndim)
  if flavour == "imagej":
    kw["imagej"] = True
    kw["metadata"] = {"axes": axes, **{k: meta[f"tiff.{k}"] for k in ("spacing", "unit")
                                       if f"tiff.{k}" in meta}}
  elif flavour == "ome":
    kw["ome"] = True
    kw["metadata"] = {"axes": axes}
    for a, size, unit in zip("XYZ", meta.get("tiff.physical_size", []),
                             meta.get("tiff.physical_unit", [])):
      if np.isfinite(size):
        kw["metadata"][f"PhysicalSize{a}"] = float(size)
      if unit:
        kw["metadata"][f"PhysicalSize{a}Unit"] = unit
  if "tiff.resolution_unit" in meta and flavour != "imagej":
    kw["resolutionunit"] = int(meta["tiff.resolution_unit"])
  # A grey-level stack whatever its first axis (tifffile would take 3 or 4 planes as RGB(A)).
  tifffile.imwrite(path, volume.data, photometric="minisblack", **kw)
