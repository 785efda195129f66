"""Run folders that may live in cloud storage: `--workdir gs://bucket/run` (also s3://, az://)
through `etils.epath`, the path library orbax uses.

`workdir_path(workdir)` is the one place a `--workdir` string becomes a path: a local folder is
made absolute, a URI of a scheme epath can write keeps its scheme, any other `scheme://` is a
ValueError, and so is a cloud URI whose client packages are missing (`REQUIRED_PACKAGES`: epath
reaches gs:// through fsspec's gcsfs, orbax also asks google-cloud-storage about the bucket;
`pip install -e '.[gcs]'`). TensorBoard event files under such a URI are written by `EpathRecordWriter`,
registered with tensorboardX for these schemes (its own `gs://` writer needs
google-cloud-storage): object stores cannot append, so like tensorboardX's writers it uploads
the whole file again on every flush.
"""
from __future__ import annotations

import importlib.util
import io
import os
import re

from etils import epath
from tensorboardX import record_writer

# Schemes epath reads and writes (hf:// is read-only).
CLOUD_SCHEMES = ("gs", "s3", "az")
# scheme -> (module, pip package) pairs a run in that storage needs.
REQUIRED_PACKAGES = {"gs": (("gcsfs", "gcsfs"), ("google.cloud.storage", "google-cloud-storage")),
                     "s3": (("s3fs", "s3fs"),), "az": (("adlfs", "adlfs"),)}


def _missing(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is None
  except ModuleNotFoundError:  # its parent package is absent
    return True


def is_cloud(path: str | os.PathLike) -> bool:
  return re.match(rf"^({'|'.join(CLOUD_SCHEMES)})://", os.fspath(path)) is not None


def workdir_path(workdir: str | os.PathLike) -> epath.Path:
  """`workdir` as an epath.Path: absolute when local, its URI when in cloud storage."""
  text = os.fspath(workdir)
  scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*)://", text)
  if scheme and not is_cloud(text):
    raise ValueError(f"--workdir {text}: scheme {scheme.group(1)}:// is not supported; use a "
                     f"local folder or one of {', '.join(s + '://' for s in CLOUD_SCHEMES)}")
  if not scheme:
    return epath.Path(os.path.abspath(text))
  missing = [pip for module, pip in REQUIRED_PACKAGES[scheme.group(1)] if _missing(module)]
  if missing:
    raise ValueError(f"--workdir {text} needs {', '.join(missing)}: pip install "
                     f"{' '.join(missing)}" + (" (or pip install -e '.[gcs]')"
                                               if scheme.group(1) == "gs" else ""))
  return epath.Path(text)


class EpathRecordWriter:
  """tensorboardX record writer for a cloud URI: buffers the event file, uploads it on flush."""

  def __init__(self, path: str):
    self.path, self.buffer = epath.Path(path), io.BytesIO()

  def write(self, data: bytes) -> None:
    self.buffer.write(data)

  def flush(self) -> None:
    self.path.write_bytes(self.buffer.getvalue())

  def close(self) -> None:
    self.flush()


class _EpathRecordWriterFactory:
  def open(self, path: str) -> EpathRecordWriter:
    return EpathRecordWriter(path)

  def directory_check(self, path: str) -> None:
    epath.Path(path).mkdir(parents=True, exist_ok=True)


for _scheme in CLOUD_SCHEMES:
  record_writer.register_writer_factory(_scheme, _EpathRecordWriterFactory())
