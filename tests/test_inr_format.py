"""moe_jax.inr file format: quantisation bounds, header round trip, damaged files, metadata of
NIfTI / TIFF volumes, and the budget / PSNR searches (no training here: fakes stand in)."""
from __future__ import annotations

import contextlib
import struct
import warnings
import zlib

import numpy as np
import pytest

from moe_jax.inr import budget, codec, fileformat as ff, quantise, volumes


@pytest.mark.parametrize("granularity", quantise.GRANULARITIES)
@pytest.mark.parametrize("bits,levels", [(8, 0), (6, 0), (2, 0), (12, 0), (10, 700)])
def test_dequantised_values_are_within_half_a_step(bits, levels, granularity):
  rng = np.random.default_rng(bits)
  top = levels or (1 << bits) - 1
  for shape in [(3, 7, 5), (4, 9), (6,), (2, 1, 3)]:
    x = rng.normal(0, 0.3, shape) * rng.uniform(0.1, 3, shape[-1:])  # channels of unlike range
    q = quantise.quantise(x, bits, granularity, levels)
    assert q.codes.dtype == (np.uint8 if bits <= 8 else np.uint16)
    assert q.codes.shape == shape and q.codes.max() <= top
    assert q.lo.size == q.step.size == quantise.num_groups(shape, granularity)
    step = q.step.astype(np.float64).reshape(quantise.group_shape(shape, granularity))
    error = np.abs(quantise.dequantise(q, granularity) - x)
    assert np.all(error <= step / 2 * (1 + 1e-3) + 1e-7), (shape, error.max())
    if granularity == "channel" and shape == (3, 7, 5):  # one step per output channel
      np.testing.assert_allclose(step[0, 0], np.ptp(x[0], axis=0) / top, rtol=2e-3)
  constant = quantise.quantise(np.full((4, 4), 0.125), bits, granularity, levels)
  np.testing.assert_array_equal(quantise.dequantise(constant, granularity), 0.125)
  with pytest.raises(ValueError, match="quant_bits=0"):
    quantise.quantise(np.array([1e5]), bits, granularity)


def test_bad_quant_settings_name_the_config_field():
  with pytest.raises(ValueError, match="quant_bits=17"):
    quantise.check(17, "tensor")
  with pytest.raises(ValueError, match=r"levels=64 must be in \[1, 2\^6 - 1\]"):
    quantise.quantise(np.ones(3), 6, "tensor", levels=64)
  with pytest.raises(ValueError, match="quant_granularity='row'"):
    quantise.check(8, "row")


@pytest.mark.parametrize("bits", [8, 6, 3, 11, 16])
def test_packed_codes_round_trip(bits):
  codes = np.random.default_rng(0).integers(0, 1 << bits, 101).astype(quantise.code_dtype(bits))
  packed = ff.pack_codes(codes, bits)
  assert len(packed) == -(-101 * bits // 8)
  np.testing.assert_array_equal(ff.unpack_codes(packed, bits, 101), codes)


META = {"nifti.scl_slope": np.array([2.5], np.float32), "nifti.xyzt_units": 10,
        "nifti.descrip": b"spm - 3D", "nifti.pixdim": np.array([-1, 2, 2.5, 0.3], np.float32),
        "nifti.dim_info": 0, "tiff.physical_unit": ["um", ""], "tiff.spacing": 0.1,
        "tiff.x_resolution": np.array([7, 3]), "affine": np.arange(16.) / 3, "flag": True,
        "custom.neg": -5.0}


def _header(storage="quantised", bits=8, granularity="tensor", coder="lzma", dtype=np.int16):
  return ff.Header((5, 6, 7), np.dtype(dtype), (-3.0, 1200.0),
                   {"kind": "moec", "width": 3, "tail_width": 2, "moe.router.k": 2,
                    "gate_input": "coords", "w0_expert": [20.0, 40.5]},
                   ff.Weights(storage, bits, granularity, coder), dict(META))


TENSORS = [np.random.default_rng(1).normal(0, 0.2, s).astype(np.float32)
           for s in [(1, 3, 4), (1, 4), (4, 4, 4), (4,)]]


@pytest.mark.parametrize("storage,bits,granularity,coder", [
    ("quantised", 8, "tensor", "lzma"), ("quantised", 6, "channel", "none"),
    ("quantised", 6, "tensor", "lzma"), ("quantised", 12, "tensor", "lzma"),
    ("quantised", 10, "channel", "none"), ("float16", 0, "tensor", "lzma"),
    ("float32", 0, "tensor", "none")])
def test_header_and_tensors_round_trip(storage, bits, granularity, coder):
  header = _header(storage, bits, granularity, coder)
  blob = ff.encode(header, [TENSORS])
  got = ff.decode(blob, "f.moec")
  h = got.header
  assert (h.shape, h.dtype, h.value_range, h.model) == (
      header.shape, header.dtype, header.value_range, header.model)
  assert h.weights.storage == storage and h.weights.bits == bits
  assert h.weights.granularity == granularity and h.weights.coder in ("none", coder)
  assert set(h.meta) == set(META)
  for k, v in META.items():
    assert np.array_equal(np.asarray(h.meta[k]), np.asarray(v)), k
    assert np.asarray(h.meta[k]).dtype.kind == np.asarray(v).dtype.kind, k
  assert got.header_bytes + len(got.payload) == len(blob)
  tensors = ff.decode_tensors(got, [t.shape for t in TENSORS], 0, "f.moec")
  for t, x in zip(tensors, TENSORS):
    if storage == "quantised":
      q = quantise.quantise(x, bits, granularity)
      np.testing.assert_array_equal(t, quantise.dequantise(q, granularity))
    else:
      np.testing.assert_array_equal(t, x.astype(ff.param_dtype(storage)).astype(np.float32))
  # Fixed fields: magic, version, shape, chunk shape, dtype, range, weights, lengths, crc32
  # (28 bytes here).
  fixed = got.header_bytes - len(ff._records(header.meta)) - len(ff._records(header.model))
  assert fixed == 4 + 1 + 4 + 3 + 1 + 3 + 4 + len(ff._varint(len(got.payload))) + 4


@pytest.mark.parametrize("coder", ff.CODERS)
def test_each_chunk_is_its_own_record_with_its_own_quantisation_groups(coder):
  """3 chunks (8 x 6 x 7 in chunks of 3 x 6 x 7): chunk k's tensors are quantised with their own
  (lo, step) groups and decode alone, from their own record; the chunk table holds 2 lengths."""
  header = _header(coder=coder)
  header.shape, header.chunk_shape = (8, 6, 7), (3, 6, 7)
  assert header.num_chunks == 3
  chunks = [[(t * (k + 1) + k).astype(np.float32) for t in TENSORS] for k in range(3)]
  got = ff.decode(ff.encode(header, chunks), "f.moec")
  assert got.header.chunk_shape == (3, 6, 7) and len(got.records) == 4
  assert got.records[0] == sum(len(ff._varint(int(n))) for n in np.diff(got.records)[:2])
  for k in (2, 0, 1):
    tensors = ff.decode_tensors(got, [t.shape for t in TENSORS], k, "f.moec")
    for t, x in zip(tensors, chunks[k]):
      np.testing.assert_array_equal(t, quantise.dequantise(quantise.quantise(x, 8, "tensor"),
                                                           "tensor"))
  with pytest.raises(ValueError, match="2 chunks of parameters for a chunk grid of 3"):
    ff.encode(header, chunks[:2])


def test_lzma_is_used_only_where_it_beats_the_packed_codes():
  uniform = [np.random.default_rng(0).uniform(-1, 1, (40,)).astype(np.float32)]  # incompressible
  peaked = [np.random.default_rng(0).normal(0, 1, (4000,)).astype(np.float32)]
  for tensors, coder in ((uniform, "none"), (peaked, "lzma")):
    blob = ff.encode(_header(bits=6), [tensors])
    got = ff.decode(blob)
    assert got.header.weights.coder == coder
    assert len(got.payload) <= 4 + -(-tensors[0].size * 6 // 8)  # table + packed codes
    q = quantise.quantise(tensors[0], 6, "tensor")
    np.testing.assert_array_equal(ff.decode_tensors(got, [tensors[0].shape], 0)[0],
                                  quantise.dequantise(q, "tensor"))


def test_rate_control_fills_the_byte_budget_and_never_exceeds_it():
  """encode_to_budget: a file whose 8-bit codes leave 12% / 4% of the budget unused is re-coded
  with more levels (finer steps, > 8 stored bits), one 4% over with fewer; every file lands
  within 1% under its budget and decodes to within half of its own step."""
  rng = np.random.default_rng(0)
  tensors = [rng.normal(0, s, shape).astype(np.float32)  # trained-like: peaked, unlike ranges
             for s, shape in [(0.3, (1, 3, 40)), (0.1, (1, 40)), (0.05, (4, 40, 40)),
                              (0.2, (4, 40)), (0.1, (1, 40, 20)), (0.3, (1, 20, 1))]]
  header = _header()
  base = ff.encode(header, [tensors])
  for fill, more in ((1.12, True), (1.04, True), (0.96, False)):
    budget_bytes = int(len(base) * fill)
    blob, levels, base_again = codec.encode_to_budget(header, [tensors], budget_bytes, 12)
    assert base_again == base and 0.99 * budget_bytes <= len(blob) <= budget_bytes, fill
    assert (levels > 255) == more and (levels < 255) == (not more), levels
    got = ff.decode(blob)
    assert got.header.weights.bits == max(levels.bit_length(), 2)
    for t, x in zip(ff.decode_tensors(got, [t.shape for t in tensors], 0), tensors):
      assert np.abs(t - x).max() <= np.ptp(x) / levels / 2 * 1.01 + 1e-6
  # No rate control (quant_max_bits = 0) or no level count that fits: the 8-bit file.
  assert codec.encode_to_budget(header, [tensors], len(base) // 2, 0) == (base, 255, base)
  assert codec.encode_to_budget(header, [tensors], 100, 12) == (base, 255, base)


def test_a_float_volume_keeps_its_exact_range():
  header = _header(dtype=np.float32)
  header.value_range = (-0.1, 1e10 / 3)
  assert ff.decode(ff.encode(header, [TENSORS])).header.value_range == header.value_range


def _with_crc(body: bytes) -> bytes:
  return body + struct.pack("<I", zlib.crc32(body))


def _craft(ndim=3, shape=(4, 4, 4), chunk_shape=None, dtype=9, value_range=struct.pack("<2d", 0.0, 1.0),
           weights=(3, 8, 0, 0), model=None, meta=b"\0", payload=None, tail=b"",
           version=ff.VERSION, magic=ff.MAGIC):
  """A file assembled field by field (default: float32 4x4x4 volume, 8-bit packed weights of a
  4-parameter stand-in), with a valid crc32."""
  model = ff._records({"kind": "moec"} if model is None else model) if not isinstance(
      model, bytes) else model
  if payload is None:  # a valid payload for the default model and weights
    payload = ff._payload([[np.zeros(4, np.float32)]], ff.Weights("quantised", 8, "tensor",
                                                                  "none"))[0]
  body = (magic + bytes([version, ndim]) + b"".join(ff._varint(n) for n in shape)
          + b"".join(ff._varint(n) for n in (shape if chunk_shape is None else chunk_shape))
          + bytes([dtype]) + value_range + bytes(weights) + model + meta
          + ff._bytes(payload) + tail)
  return _with_crc(body)


GOOD = ff.encode(_header(), [TENSORS])


@pytest.mark.parametrize("blob,message", [
    (b"not a file", "bad magic"),
    (GOOD[:3], "bad magic"),
    (b"MOEX" + GOOD[4:], "bad magic"),
    (b"MOECINR\0\2\0" + GOOD[4:], "version-1 prefix \\(version 2"),
    (GOOD[:4] + b"\x01" + GOOD[5:], "format version 1"),
    (GOOD[:5], "too short"),
    (GOOD[:-1], "checksum mismatch"),
    (GOOD[:len(GOOD) // 2], "checksum mismatch"),
    (GOOD[:20] + bytes([GOOD[20] ^ 0x10]) + GOOD[21:], "checksum mismatch"),
    (GOOD + b"\0", "checksum mismatch"),
    (_craft(ndim=0, shape=()), "ndim 0"),
    (_craft(ndim=5, shape=(2,) * 5), "ndim 5"),
    (_craft(shape=(4, 0, 4)), "not positive"),
    (_craft(shape=(1 << 20, 1 << 20, 1 << 20)), "exceeds"),
    (_craft(chunk_shape=(4, 0, 4)), "chunk_shape \\(4, 0, 4\\) is not in"),
    (_craft(chunk_shape=(4, 5, 4)), "chunk_shape \\(4, 5, 4\\) is not in"),
    (_craft(chunk_shape=(2, 4, 4), payload=b"\x7f\0\0"),
     "the chunk table's records end at byte 128"),
    (_craft(shape=(1 << 11,) * 3, chunk_shape=(1, 1, 1)),
     "8589934592 chunks need a chunk table of 8589934591 lengths"),
    (_craft(dtype=200), "dtype code 200"),
    (_craft(value_range=struct.pack("<2d", 0.0, np.inf)), "not finite"),
    (_craft(weights=(7, 8, 0, 0)), "weight coding"),
    (_craft(weights=(3, 17, 0, 0)), "quant_bits=17"),
    (_craft(weights=(3, 8, 9, 0)), "weight coding"),
    (_craft(model=ff._records({"kind": "nope"})), "model.kind"),
    (_craft(model=ff._records({"kind": "moec", "nope": 1})), "do not fit"),
    (_craft(model=ff._records({"kind": "moec", "width": "wide"})), "do not fit"),
    (_craft(model=b"\x05\x7f\x00"), "key 127 is unknown"),
    (_craft(model=b"\x03\x01\x63\x00"), "unknown value tag 99"),
    (_craft(model=b"\x09\x01\x02\x40hello"), "runs past the end"),
    (_craft(model=ff._varint(1 << 20)), "exceeds the 65536-byte limit"),
    (_craft(model=b"\x0c\x01\x00" + b"\xff" * 10), "not a varint"),
    (_craft(meta=b"\x04\x01\x08\x7f\x00"), "nests too deep or lists more"),
    (_craft(tail=b"xx"), "2 bytes after the payload"),
    (_with_crc(b"MOEC\x02\x03\x04\x04"), "shape runs past the end"),
    (_with_crc(GOOD[:30]), "runs past the end"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_damaged_inr_files_are_one_line_value_errors(blob, message):
  with peak_python_bytes() as peak, pytest.raises(ValueError, match=message) as e:
    ff.decode(blob, "f.moec")
  assert "\n" not in str(e.value) and str(e.value).startswith("f.moec"), str(e.value)
  assert peak[0] < 8 << 20, peak  # nothing sized by the crafted header is allocated


def _payload_blob(payload: bytes, bits=8, coder=1, model=None) -> bytes:
  return _craft(weights=(3, bits, 0, coder), payload=payload,
                model=ff._records(model or {"kind": "moec", "width": 1, "tail_width": 1}))


def _moec_1x1_shapes():
  from flax import nnx
  import jax
  from moe_jax.inr import fileformat, model as model_lib
  c = fileformat.model_from_diff({"kind": "moec", "width": 1, "tail_width": 1})
  abstract = nnx.eval_shape(lambda: model_lib.build(c, 3, rngs=nnx.Rngs(0)))
  return [p.shape for p in jax.tree.leaves(nnx.state(abstract, nnx.Param))]


@pytest.mark.parametrize("case,message", [
    ("short table", "quantisation table runs past"),
    ("lzma garbage", "does not decode"),
    ("lzma short", "decodes to 5 bytes"),
    ("packed short", "decodes to 3 bytes"),
    ("lzma long", "decodes to more than"),
    ("lzma trailing", "2 bytes after its end"),
    ("code too large", "holds code 200 >= 2\\^6"),
], ids=lambda x: x if " " in x else None)
def test_damaged_payloads_are_one_line_value_errors(case, message):
  import lzma
  shapes = _moec_1x1_shapes()
  n, table = sum(int(np.prod(s)) for s in shapes), b"\0" * 4 * len(shapes)
  code = lambda raw: lzma.compress(raw, lzma.FORMAT_RAW, filters=ff._LZMA_FILTERS)
  payload, bits, coder = {
      "short table": (b"\0" * 5, 8, 1),
      "lzma garbage": (table + b"\xff" * 40, 8, 1),
      "lzma short": (table + code(b"\1" * 5), 8, 1),
      "packed short": (table + b"\0" * 3, 8, 0),
      "lzma long": (table + code(b"\1" * (n + 1)), 8, 1),
      "lzma trailing": (table + code(b"\1" * n) + b"\0\0", 8, 1),
      "code too large": (table + code(bytes([200]) * n), 6, 1),
  }[case]
  compressed = ff.decode(_payload_blob(payload, bits, coder), "f.moec")
  with pytest.raises(ValueError, match=message) as e:
    ff.decode_tensors(compressed, shapes, 0, "f.moec")
  assert "\n" not in str(e.value) and str(e.value).startswith("f.moec: ")


def test_a_huge_declared_model_is_rejected_before_it_is_built():
  blob = _payload_blob(b"\0" * 64, model={"kind": "moec", "width": 1 << 20,
                                          "tail_width": 1 << 20})
  with peak_python_bytes() as peak, pytest.raises(
      ValueError, match="64 payload bytes stored, the header's model needs 1 chunk"):
    codec.Decoder(blob, "f.moec")
  assert peak[0] < 64 << 20, peak


def _scaled_nifti(path: str) -> volumes.Volume:
  source = volumes.load(volumes.example_path("anatomical.nii"))
  meta = {**source.meta, "nifti.scl_slope": np.array([2.5], np.float32),
          "nifti.scl_inter": np.array([100.0], np.float32), "nifti.cal_max": np.array(
              [9000.0], np.float32), "nifti.intent_name": b"test"}
  volume = volumes.Volume(source.data[:20, :24, :10], source.affine, meta)
  volumes.save(path, volume)
  return volume


def test_nifti_header_fields_and_scaling_survive_save_and_load(tmp_path):
  import nibabel
  path = str(tmp_path / "scaled.nii.gz")
  volume = _scaled_nifti(path)
  image = nibabel.load(path)
  np.testing.assert_array_equal(np.asanyarray(image.dataobj.get_unscaled()), volume.data)
  np.testing.assert_allclose(np.asanyarray(image.dataobj), volume.data * 2.5 + 100)
  loaded = volumes.load(path)
  assert set(loaded.meta) == set(volume.meta)
  for k, v in volume.meta.items():
    assert np.array_equal(np.asarray(loaded.meta[k]), np.asarray(v)), k
  np.testing.assert_array_equal(volumes.physical(loaded), volume.data * 2.5 + 100)
  assert volumes.physical(loaded).mean() == pytest.approx(2.5 * volume.data.mean() + 100)
  np.testing.assert_allclose(loaded.affine, volume.affine)
  assert volumes.physical(volumes.Volume(volume.data)) is volume.data  # no scaling: raw


@pytest.mark.parametrize("name", ["anatomical.nii", "example4d.nii.gz"])
def test_every_nifti_header_field_survives_load_and_save(tmp_path, name):
  import nibabel
  path = volumes.example_path(name)
  out = str(tmp_path / name)
  volumes.save(out, volumes.load(path))
  a, b = nibabel.load(path).header, nibabel.load(out).header
  for field in a.keys():
    x, y = np.asarray(a[field]), np.asarray(b[field])
    assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), (field, x, y)


@pytest.mark.parametrize("flavour", ["imagej", "ome", "plain"])
def test_tiff_spacing_survives_save_and_load(tmp_path, flavour):
  data = np.arange(3 * 5 * 6, dtype=np.uint16).reshape(3, 5, 6)
  meta = {"tiff.flavour": flavour, "tiff.x_resolution": np.array([2, 1]),
          "tiff.y_resolution": np.array([4, 3])}
  meta.update({"imagej": {"tiff.spacing": 3.5, "tiff.unit": "um", "tiff.resolution_unit": 1},
               "ome": {"tiff.physical_size": np.array([0.5, 0.25, 2.0]),
                       "tiff.physical_unit": ["µm", "µm", "mm"], "tiff.resolution_unit": 2},
               "plain": {"tiff.resolution_unit": 3}}[flavour])
  path = str(tmp_path / "v.tif")
  volumes.save(path, volumes.Volume(data, None, meta))
  loaded = volumes.load(path)
  np.testing.assert_array_equal(loaded.data, data)
  assert set(loaded.meta) == set(meta), (loaded.meta, meta)
  for k, v in meta.items():
    assert np.array_equal(np.asarray(loaded.meta[k]), np.asarray(v)), (k, loaded.meta[k])


def _fake_attempt(log: list, overhead: int, coded_bpp: float, params_per_bpp: float):
  """attempt(bpp) of a codec whose widths give params_per_bpp / bpp parameters that code to
  coded_bpp bytes each; PSNR grows with the parameter count."""
  def attempt(bpp):
    n = int(params_per_bpp / bpp)
    size = overhead + int(np.ceil(n * coded_bpp))
    log.append(bpp)
    return b"\0" * size, {"psnr": 10 + n / 100, "num_params": n,
                          "base_param_bytes": size - overhead,
                          "ratio_actual": 1e5 / size, "ratio_target": 1e5 / 1000,
                          "width": max(n // 100, 1), "tail_width": max(n // 100, 1)}, n
  return attempt


def test_fit_to_budget_grows_into_the_measured_coded_size():
  log = []
  blob, report, n = budget.fit_to_budget(_fake_attempt(log, 100, 0.8, 900.0), 1000, 1.0, 3)
  assert log[0] == 1.0 and log[1] == pytest.approx(0.8, rel=1e-3)
  assert len(blob) <= 1000 and n == 1125 and report["budget_trials"] == 2  # 3rd = same widths


def test_fit_to_budget_never_returns_a_file_over_the_budget():
  log = []  # the coder expands (1.2 B/param): trial 1 at 1 B/param is over, trial 2 shrinks
  blob, report, _ = budget.fit_to_budget(_fake_attempt(log, 100, 1.2, 900.0), 1000, 1.0, 2)
  assert len(blob) <= 1000 and log[1] > 1.2


def test_fit_to_budget_warns_with_the_ratio_reached_when_the_smallest_model_is_too_big():
  with pytest.warns(UserWarning, match=r"cannot be met.*1900 bytes.*ratio 52\.6 instead of "
                                       r"100; the widths cannot fall below H = T = 1"):
    blob, _, _ = budget.fit_to_budget(_fake_attempt([], 1000, 9.0, 100.0), 1000, 1.0, 3)
  assert len(blob) == 1900


def test_search_psnr_finds_the_smallest_file_reaching_the_target():
  calls = []
  def attempt(ratio):  # PSNR falls 3 dB per doubling of the ratio: 40 dB at 10x
    calls.append(ratio)
    size = int(1e5 / ratio)
    return b"\0" * size, {"psnr": 40 - 3 * np.log2(ratio / 10), "ratio_actual": 1e5 / size}, 0
  blob, report, _ = budget.search_psnr(attempt, 31.0, 2.0, 1000.0, 8)
  assert len(calls) == 8 and report["psnr"] >= 31.0 and report["psnr_trials"] == 8
  assert 70 < 1e5 / len(blob) <= 80  # 31 dB is reached up to 80x
  with pytest.warns(UserWarning, match=r"PSNR target 60 dB not reached in 3 trials.*best file"):
    _, report, _ = budget.search_psnr(attempt, 60.0, 2.0, 1000.0, 3)
  assert report["psnr"] == max(40 - 3 * np.log2(r / 10) for r in calls[-3:])
  with pytest.raises(ValueError, match="psnr_search"):
    budget.search_psnr(attempt, 30.0, 10.0, 5.0, 3)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    budget.search_psnr(attempt, 20.0, 2.0, 1000.0, 2)  # reached: no warning


@contextlib.contextmanager
def peak_python_bytes():
  """Yields a one-element list that holds, on exit, the peak bytes traced by `tracemalloc`
  (Python and numpy allocations) inside the block."""
  import tracemalloc
  peak = [0]
  tracemalloc.start()
  try:
    yield peak
  finally:
    peak[0] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()


def test_version_1_files_still_decode():
  """A file of the previous format (JSON header, raw float16 parameters) decodes to the same
  tensors and affine."""
  import json
  header = {"model": {"kind": "moec", "width": 1, "tail_width": 1}, "shape": [4, 5, 6],
            "dtype": "<i2", "affine": list(np.arange(16.0)), "range": [-2.0, 9.0],
            "param_dtype": "float16"}
  shapes = _moec_1x1_shapes()
  params = np.random.default_rng(0).normal(size=sum(int(np.prod(s)) for s in shapes))
  packed = zlib.compress(json.dumps(header).encode())
  blob = (struct.pack("<8sHI", b"MOECINR\0", 1, len(packed)) + packed
          + params.astype("<f2").tobytes())
  compressed = ff.decode(blob, "old.moec")
  h = compressed.header
  assert (h.shape, h.value_range, h.weights.storage) == ((4, 5, 6), (-2.0, 9.0), "float16")
  np.testing.assert_array_equal(h.meta["affine"], np.arange(16.0))
  tensors = ff.decode_tensors(compressed, shapes, 0, "old.moec")
  np.testing.assert_array_equal(np.concatenate([t.reshape(-1) for t in tensors]),
                                params.astype(np.float16).astype(np.float32))
  with pytest.raises(ValueError, match="old.moec: corrupt version-1 header"):
    ff.decode(blob[:14] + b"\0" + blob[15:], "old.moec")


def test_compress_takes_either_a_ratio_or_a_psnr_target():
  from moe_jax.commands import inr as inr_command
  p = inr_command.parser()
  args = p.parse_args(["compress", "--input", "v.nii", "--psnr", "30", "--out", "f"])
  assert (args.psnr, args.ratio) == (30.0, None)
  for bad in (["--ratio", "10", "--psnr", "30"], []):
    with pytest.raises(SystemExit):
      p.parse_args(["compress", "--input", "v.nii", "--out", "f"] + bad)
