"""Preprocessing as config strings in the big_vision style, parsed and checked before the run.

    data.pp_train = "decode|inception_crop(224)|flip_lr|randaug(2, 15)|normalize('imagenet')"
    evals.val.pp = "decode|resize_small(256)|central_crop(224)|normalize('imagenet')"

Ops are separated by `|`; each is `name` or `name(args)` with Python literal arguments. Two
stages, in this order:

- example ops (one image at a time, PIL images of any size): `decode`, `resize`, `resize_small`,
  `central_crop`, `inception_crop`, `pad_crop`, `flip_lr`, `randaug`, `pad_square`;
- batch ops (on the stacked batch): `normalize` (exactly once, first: uint8 -> float32
  `[B, H, W, C]`), then the label ops `label_smoothing`, `mixup`, `cutmix`, which add
  `soft_label` float32 `[B, num_classes]` (each row sums to 1; `label` keeps the example's own
  class for accuracy).

Size arguments left out mean `data.image_size` (so `--config.data.image_size=32` needs no new pp
string); the example ops must end at `image_size x image_size`. Random ops draw from the rng of
their example (example ops) or of the whole global batch (mixup, cutmix), which the pipeline
seeds from (seed, step, position in the global batch), so the result is the same on any number
of processes. Evaluation pp strings (`config.evals.<name>.pp`) may hold no random op.
"""
from __future__ import annotations

import ast
import inspect
import io
import math
from typing import Any

import numpy as np
from PIL import Image

from moe_jax.data import randaug, transforms

Size = tuple[int, int] | None  # (H, W) of an image; None: varies from image to image
Batch = dict[str, np.ndarray]


class Op:
  """One preprocessing op. `random`: draws from an rng; `stage`: 'example' or 'batch'."""

  random = False
  stage = "example"

  def output_size(self, size: Size) -> Size:
    """(H, W) of the output for inputs of `size`."""
    return size


class ExampleOp(Op):
  def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
    raise NotImplementedError

  def on_array(self, images: np.ndarray, rngs: list) -> np.ndarray | None:
    """The op on a uint8 batch `[B, H, W, C]` of equal-size images in numpy, drawing from
    `rngs[i]` exactly what `__call__` draws for example i; None where there is no such path."""
    return None


class BatchOp(Op):
  stage = "batch"

  def __call__(self, batch: Batch, rng: np.random.Generator) -> Batch:
    raise NotImplementedError


def _positive_size(size) -> int:
  if not isinstance(size, int) or size < 1:
    raise ValueError(f"size={size!r} must be a positive int")
  return size


class Decode(ExampleOp):
  """`decode`: JPEG/PNG bytes of a tfds `Image` feature -> an image with data.channels channels
  (RGB or L). Lazy: a following resize or crop lets the JPEG decoder scale by 1/2, 1/4 or 1/8
  in the DCT (`PIL.Image.draft`) while the region it keeps stays at least its output size."""

  def __init__(self, *, channels: int):
    if channels not in (1, 3):
      raise ValueError(f"data.channels={channels}: decode gives 1 or 3 channels")

  def __call__(self, encoded: bytes, rng) -> Image.Image:
    return Image.open(io.BytesIO(encoded))

  def output_size(self, size: Size) -> Size:
    return None


def _loaded(image: Image.Image, mode: str) -> Image.Image:
  return image if image.mode == mode else image.convert(mode)


def _draft(image: Image.Image, box: tuple[float, float, float, float], out: tuple[int, int],
           mode: str):
  """(image, box) with a not yet decoded JPEG set to decode scaled down as far as keeps `box`
  (x0, y0, x1, y1) at least `out` (W, H) pixels; the box in the scaled image's coordinates."""
  if getattr(image, "format", None) != "JPEG" or not image.tile:
    return image, box
  w, h = image.size
  scale = min((box[2] - box[0]) / out[0], (box[3] - box[1]) / out[1])
  if scale >= 2:
    image.draft(mode, (math.ceil(w / scale), math.ceil(h / scale)))
    fx, fy = image.size[0] / w, image.size[1] / h
    box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
  return image, box


def _resize_box(image: Image.Image, box, out: tuple[int, int], mode: str,
                resample: Image.Resampling) -> Image.Image:
  """The `box` region of `image` resized to `out` (W, H), antialiased when shrinking."""
  image, box = _draft(image, box, out, mode)
  return _loaded(image, mode).resize(out, resample, box=box)


_METHODS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
            "nearest": Image.Resampling.NEAREST, "area": Image.Resampling.BOX}


def _method(method: str) -> Image.Resampling:
  if method not in _METHODS:
    raise ValueError(f"method={method!r} must be one of {sorted(_METHODS)}")
  return _METHODS[method]


class _Geometric(ExampleOp):
  """Base of ops that produce a square `size` (data.image_size when left out)."""

  def __init__(self, size: int | None = None, method: str = "bilinear", *, image_size: int,
               mode: str):
    self.size = _positive_size(image_size if size is None else size)
    self.resample, self.mode = _method(method), mode

  def output_size(self, size: Size) -> Size:
    return (self.size, self.size)


class Resize(_Geometric):
  """`resize(size=image_size, method='bilinear')`: the whole image to `size x size`
  (antialiased when shrinking; 'nearest', 'bicubic', 'area' also)."""

  def __call__(self, image, rng):
    s = self.size
    if image.size == (s, s):
      return image
    return _resize_box(image, (0, 0, *image.size), (s, s), self.mode, self.resample)

  def on_array(self, images, rngs):
    return images if images.shape[1:3] == (self.size, self.size) else None


class ResizeSmall(_Geometric):
  """`resize_small(size=image_size, method='bilinear')`: the shorter side to `size`, aspect
  kept (the longer side rounded), antialiased."""

  def __call__(self, image, rng):
    w, h = image.size
    scale = self.size / min(w, h)
    out = (max(1, round(w * scale)), max(1, round(h * scale)))
    return _resize_box(image, (0, 0, w, h), out, self.mode, self.resample)

  def output_size(self, size: Size) -> Size:
    if size is None:
      return None
    scale = self.size / min(size)
    return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))


class CentralCrop(_Geometric):
  """`central_crop(size=image_size)`: the central `size x size` pixels (images must be at least
  that big: resize_small first)."""

  def __call__(self, image, rng):
    w, h = image.size
    s = self.size
    if w < s or h < s:
      raise ValueError(f"central_crop({s}) of a {h}x{w} image: resize_small({s}) first")
    x0, y0 = (w - s) // 2, (h - s) // 2
    return _loaded(image, self.mode).crop((x0, y0, x0 + s, y0 + s))


class InceptionCrop(_Geometric):
  """`inception_crop(size=image_size, scale=(0.05, 1.0), ratio=(3/4, 4/3), method='bilinear')`:
  a random box covering a fraction in `scale` of the image area with aspect ratio (w/h) in
  `ratio` (log-uniform), resized to `size x size`. The box is drawn as torchvision's
  RandomResizedCrop does (10 tries, then the central crop at the nearest allowed ratio); the
  default area range is big_vision's / vmoe's (area_min=5%), not torchvision's 8%."""

  random = True

  def __init__(self, size: int | None = None, scale: tuple[float, float] = (0.05, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3), method: str = "bilinear", *,
               image_size: int, mode: str):
    super().__init__(size, method, image_size=image_size, mode=mode)
    for name, (low, high) in (("scale", scale), ("ratio", ratio)):
      if not 0 < low <= high:
        raise ValueError(f"{name}={(low, high)} must satisfy 0 < low <= high")
    if scale[1] > 1:
      raise ValueError(f"scale={scale}: fractions of the image area are at most 1")
    self.scale, self.log_ratio = scale, (math.log(ratio[0]), math.log(ratio[1]))
    self.ratio = ratio

  def box(self, w: int, h: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the crop in a `w x h` image."""
    area = w * h
    for _ in range(10):
      target = area * rng.uniform(*self.scale)
      aspect = math.exp(rng.uniform(*self.log_ratio))
      cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
      if 0 < cw <= w and 0 < ch <= h:
        x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        return x0, y0, x0 + cw, y0 + ch
    aspect = w / h
    if aspect < self.ratio[0]:
      cw, ch = w, round(w / self.ratio[0])
    elif aspect > self.ratio[1]:
      cw, ch = round(h * self.ratio[1]), h
    else:
      cw, ch = w, h
    x0, y0 = (w - cw) // 2, (h - ch) // 2
    return x0, y0, x0 + cw, y0 + ch

  def __call__(self, image, rng):
    s = self.size
    return _resize_box(image, self.box(*image.size, rng), (s, s), self.mode, self.resample)


class PadSquare(ExampleOp):
  """`pad_square`: pads the shorter side to a square centred on the image (offset
  `(long - short) // 2`), filled with the colour of data.normalization's mean
  (`round(255 * mean)`): LLaVA's `expand2square` (`image_aspect_ratio='pad'`)."""

  def __init__(self, *, normalization: str, channels: int):
    mean, _ = transforms.normalization_stats(normalization, channels)
    self.fill = tuple(int(round(255 * m)) for m in mean)
    self.mode = {1: "L", 3: "RGB"}[channels]

  def __call__(self, image, rng):
    w, h = image.size
    if w == h:
      return image
    image = _loaded(image, self.mode)
    out = Image.new(self.mode, (max(w, h),) * 2, self.fill if len(self.fill) > 1 else self.fill[0])
    out.paste(image, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return out

  def output_size(self, size: Size) -> Size:
    return None if size is None else (max(size),) * 2


class PadCrop(ExampleOp):
  """`pad_crop(padding)`: zero-pad `padding` pixels on each side, then a random crop back to the
  input size (the classic CIFAR/MNIST augmentation)."""

  random = True

  def __init__(self, padding: int, *, mode: str):
    if not isinstance(padding, int) or padding < 0:
      raise ValueError(f"padding={padding!r} must be an int >= 0")
    self.padding, self.mode = padding, mode

  def __call__(self, image, rng):
    p = self.padding
    dx, dy = rng.integers(0, 2 * p + 1, size=2)
    w, h = image.size
    # crop() pads outside the image with zeros
    return _loaded(image, self.mode).crop((dx - p, dy - p, dx - p + w, dy - p + h))

  def on_array(self, images, rngs):
    p = self.padding
    B, H, W, _ = images.shape
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (H, W), axis=(1, 2))
    dx, dy = np.stack([r.integers(0, 2 * p + 1, size=2) for r in rngs]).T
    return windows[np.arange(B), dy, dx].transpose(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]


class FlipLr(ExampleOp):
  """`flip_lr(p=0.5)`: mirror left-right with probability `p`."""

  random = True

  def __init__(self, p: float = 0.5, *, mode: str):
    if not 0 <= p <= 1:
      raise ValueError(f"p={p!r} must be in [0, 1]")
    self.p, self.mode = p, mode

  def __call__(self, image, rng):
    if rng.random() < self.p:
      return _loaded(image, self.mode).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return image

  def on_array(self, images, rngs):
    flip = np.array([r.random() < self.p for r in rngs])
    return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


class RandAug(ExampleOp):
  """`randaug(num_layers=2, magnitude=10)`: RandAugment, big_vision's op set (`randaug.py`)."""

  random = True

  def __init__(self, num_layers: int = 2, magnitude: float = 10, *, mode: str):
    if not isinstance(num_layers, int) or num_layers < 0:
      raise ValueError(f"num_layers={num_layers!r} must be an int >= 0")
    if not 0 <= magnitude <= 30:
      raise ValueError(f"magnitude={magnitude!r} must be in [0, 30] (10 = the maximum level)")
    self.num_layers, self.magnitude, self.mode = num_layers, float(magnitude), mode

  def __call__(self, image, rng):
    return randaug.randaugment(_loaded(image, self.mode), self.num_layers, self.magnitude, rng)


class Normalize(BatchOp):
  """`normalize(preset=data.normalization)`: uint8 -> float32 `(x / 255 - mean) / std` with the
  preset's per-channel statistics. A preset given here must equal data.normalization (one
  setting, which pretrained-weight configs set)."""

  def __init__(self, preset: str | None = None, *, normalization: str, channels: int):
    if preset is not None and preset != normalization:
      raise ValueError(f"normalize({preset!r}) but data.normalization={normalization!r}: set "
                       f"data.normalization={preset!r} or write `normalize`")
    self.stats = transforms.normalization_stats(normalization, channels)

  def __call__(self, batch, rng):
    return {**batch, "image": transforms.normalise(batch["image"], *self.stats)}


class LabelOp(BatchOp):
  """Base of the ops that make or change `soft_label` `[B, num_classes]`."""

  def __init__(self, *, num_classes: int):
    self.num_classes = num_classes

  def soft(self, batch: Batch) -> np.ndarray:
    if "soft_label" in batch:
      return batch["soft_label"]
    return np.eye(self.num_classes, dtype=np.float32)[batch["label"]]


class LabelSmoothing(LabelOp):
  """`label_smoothing(epsilon)`: targets `(1 - epsilon) * onehot + epsilon / num_classes`."""

  def __init__(self, epsilon: float, *, num_classes: int):
    super().__init__(num_classes=num_classes)
    if not 0 <= epsilon < 1:
      raise ValueError(f"epsilon={epsilon!r} must be in [0, 1)")
    self.epsilon = epsilon

  def __call__(self, batch, rng):
    soft = self.soft(batch) * (1 - self.epsilon) + self.epsilon / self.num_classes
    return {**batch, "soft_label": soft.astype(np.float32)}


def pair_partner(n: int) -> np.ndarray:
  """Positions `0..n-1` -> their partner: pairs (0, 1), (2, 3), ... swap. Pairs never cross a
  process's slice of the global batch (slices have even length), so mixing needs no
  communication and is the same on any number of processes."""
  return np.arange(n) ^ 1


class _Mix(LabelOp):
  """Base of mixup / cutmix: mixes each pair of `pair_partner` in place (the batch's own fresh
  image buffer; a new full-batch buffer costs more than the arithmetic: measured 10 ms per
  image for three 19 MB temporaries at 32 x 224 x 224 x 3 on the shared CPU, page faults)."""

  random = True

  def __init__(self, alpha: float, p: float = 1.0, *, num_classes: int):
    super().__init__(num_classes=num_classes)
    if not alpha > 0:
      raise ValueError(f"alpha={alpha!r} must be > 0")
    if not 0 <= p <= 1:
      raise ValueError(f"p={p!r} must be in [0, 1]")
    self.alpha, self.p = alpha, p

  def __call__(self, batch, rng):
    lam = rng.beta(self.alpha, self.alpha)
    if rng.random() >= self.p:
      return batch
    lam = self.mix_pairs(batch["image"], np.float32(lam), rng)
    soft = self.soft(batch)
    partner = pair_partner(len(batch["label"]))
    return {**batch, "soft_label": lam * soft + (1 - lam) * soft[partner]}

  def mix_pairs(self, image: np.ndarray, lam: np.float32, rng) -> np.float32:
    """Mixes `image[2k]` with `image[2k + 1]` in place; the weight of each image's own pixels."""
    raise NotImplementedError


class Mixup(_Mix):
  """`mixup(alpha, p=1.0)`: with probability `p` per batch, every image becomes
  `lam * x + (1 - lam) * x_partner` (targets likewise), `lam ~ Beta(alpha, alpha)` once per
  global batch (timm's batch mode); partners are the pairs of `pair_partner`."""

  def mix_pairs(self, image, lam, rng):
    for a, b in zip(image[0::2], image[1::2]):
      step = (1 - lam) * (a - b)  # a' = a - (1 - lam)(a - b), b' = b + (1 - lam)(a - b)
      a -= step
      b += step
    return lam


class Cutmix(_Mix):
  """`cutmix(alpha, p=1.0)`: with probability `p` per batch, one box (the same for the batch,
  timm's batch mode) of area fraction `1 - lam`, `lam ~ Beta(alpha, alpha)`, centred uniformly
  and clipped to the image, is swapped between partners; targets mix by the box's true area."""

  def mix_pairs(self, image, lam, rng):
    _, h, w, _ = image.shape
    cut = math.sqrt(1 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
    y0, y1 = np.clip([cy - ch // 2, cy + ch // 2], 0, h)
    x0, x1 = np.clip([cx - cw // 2, cx + cw // 2], 0, w)
    a, b = image[0::2, y0:y1, x0:x1], image[1::2, y0:y1, x0:x1]
    a[...], b[...] = b.copy(), a.copy()
    return np.float32(1 - (y1 - y0) * (x1 - x0) / (h * w))


# name -> (class, the data-config fields it is built with)
OPS: dict[str, tuple[type[Op], tuple[str, ...]]] = {
    "decode": (Decode, ("channels",)),
    "resize": (Resize, ("image_size", "mode")),
    "resize_small": (ResizeSmall, ("image_size", "mode")),
    "central_crop": (CentralCrop, ("image_size", "mode")),
    "inception_crop": (InceptionCrop, ("image_size", "mode")),
    "pad_crop": (PadCrop, ("mode",)),
    "flip_lr": (FlipLr, ("mode",)),
    "randaug": (RandAug, ("mode",)),
    "pad_square": (PadSquare, ("normalization", "channels")),
    "normalize": (Normalize, ("normalization", "channels")),
    "label_smoothing": (LabelSmoothing, ("num_classes",)),
    "mixup": (Mixup, ("num_classes",)),
    "cutmix": (Cutmix, ("num_classes",)),
}


def _parse_op(text: str) -> tuple[str, tuple, dict[str, Any]]:
  """'name' or 'name(literal args)' -> (name, args, kwargs); ValueError when it is neither."""
  try:
    node = ast.parse(text, mode="eval").body
    if isinstance(node, ast.Name):
      return node.id, (), {}
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
      return (node.func.id, tuple(ast.literal_eval(a) for a in node.args),
              {k.arg: ast.literal_eval(k.value) for k in node.keywords})
  except (SyntaxError, ValueError):
    pass
  raise ValueError("not an op: write name or name(args) with literal args")


class Pipeline:
  """A parsed pp string: `example_ops` then `batch_ops`, checked against the data config."""

  def __init__(self, spec: str, field: str, config):
    """`field`: the config field (for messages), e.g. 'data.pp_train'; `config`: the data node."""
    self.spec, self.field = spec, field
    context = {"image_size": config.image_size, "channels": config.channels,
               "num_classes": config.num_classes, "normalization": config.normalization,
               "mode": {1: "L", 3: "RGB"}.get(config.channels, "RGB")}
    ops = []
    for text in (t.strip() for t in spec.split("|")):
      try:
        name, args, kwargs = _parse_op(text)
        if name not in OPS:
          raise ValueError(f"unknown op; ops: {', '.join(OPS)}")
        cls, fields = OPS[name]
        signature = inspect.signature(cls.__init__)
        try:
          signature.bind(None, *args, **kwargs, **dict.fromkeys(fields))
        except TypeError as e:
          params = [p for p in list(signature.parameters.values())[1:]
                    if p.kind != p.KEYWORD_ONLY]
          raise ValueError(f"{e}; signature {name}({', '.join(map(str, params))})") from None
        ops.append(cls(*args, **kwargs, **{f: context[f] for f in fields}))
      except ValueError as e:
        raise ValueError(f"{field}={spec!r}: op {text!r}: {e}") from None
    self._check_order(ops)
    self.ops = ops
    self.example_ops = [op for op in ops if op.stage == "example"]
    self.batch_ops = [op for op in ops if op.stage == "batch"]
    self.decodes = isinstance(ops[0], Decode)
    self.soft_labels = any(isinstance(op, LabelOp) for op in ops)
    self.mixes_pairs = any(isinstance(op, _Mix) for op in ops)
    self.image_size, self.mode = config.image_size, context["mode"]
    self.random = any(op.random for op in ops)

  def _check_order(self, ops: list[Op]) -> None:
    names = [type(op).__name__ for op in ops]
    stages = [op.stage for op in ops]
    if stages.count("batch") and "example" in stages[stages.index("batch"):]:
      raise ValueError(f"{self.field}={self.spec!r}: example ops (decode, crops, flips, randaug) "
                       f"must all come before normalize and the label ops")
    if names.count("Normalize") != 1 or stages.count("batch") and not isinstance(
        ops[stages.index("batch")], Normalize):
      raise ValueError(f"{self.field}={self.spec!r}: needs exactly one normalize, after the "
                       f"image ops and before the label ops")
    if "Decode" in names[1:]:
      raise ValueError(f"{self.field}={self.spec!r}: decode must be the first op")

  def check_source(self, stored: Size, encoded: bool, dataset: str) -> None:
    """ValueError unless the ops fit the dataset: `decode` exactly when its images are encoded
    and, from the stored (H, W), the example ops end at `image_size x image_size`."""
    if encoded and not self.decodes:
      raise ValueError(f"{self.field}={self.spec!r}: {dataset} stores encoded images; start "
                       f"with decode")
    if self.decodes and not encoded:
      raise ValueError(f"{self.field}={self.spec!r}: {dataset} stores decoded image arrays; "
                       f"drop decode")
    size = stored
    short = None if stored is None else min(stored)  # the shorter side, where it is known
    for op in self.example_ops:
      if isinstance(op, CentralCrop) and short is not None and short < op.size:
        raise ValueError(f"{self.field}={self.spec!r}: central_crop({op.size}) of images whose "
                         f"shorter side is {short}: resize_small({op.size}) (or more) first")
      size = op.output_size(size)
      short = (min(size) if size is not None else op.size if isinstance(op, ResizeSmall)
               else None if isinstance(op, Decode) else short)
    want = (self.image_size, self.image_size)
    if size != want:
      got = "images of varying size" if size is None else f"{size[0]}x{size[1]} images"
      raise ValueError(f"{self.field}={self.spec!r} gives {got} from {dataset}, but "
                       f"data.image_size={self.image_size}: end the image ops with resize, "
                       f"central_crop or inception_crop")

  def example(self, image: np.ndarray | Image.Image | bytes, rng: np.random.Generator | None,
              start: int = 0) -> np.ndarray:
    """One image (stored uint8 `[H, W, C]`, encoded bytes, or PIL after example op `start`)
    through the example ops from `start` -> uint8 `[S, S, C]`."""
    if isinstance(image, np.ndarray):
      image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    for op in self.example_ops[start:]:
      image = op(image, rng)
    array = np.asarray(_loaded(image, self.mode))
    return array[..., None] if array.ndim == 2 else array

  def batch(self, images: np.ndarray | list, labels: np.ndarray, rngs: list,
            batch_rng: np.random.Generator | None) -> Batch:
    """Stored images of a batch (uint8 `[B, H, W, C]`, or a list of arrays or encoded bytes) and
    int32 labels `[B]` -> `image` float32 `[B, S, S, C]`, `label` `[B]` (+ `soft_label`
    `[B, num_classes]`). `rngs[i]` is example i's rng, `batch_rng` the global batch's (None
    when no op is random). A stacked batch goes through the leading ops that have a numpy
    path (`on_array`) at once, the rest example by example (same results)."""
    start = 0
    if isinstance(images, np.ndarray):
      for op in self.example_ops:
        out = op.on_array(images, rngs)
        if out is None:
          break
        images, start = out, start + 1
    if start < len(self.example_ops):
      images = np.stack([self.example(x, r, start) for x, r in zip(images, rngs)])
    out = {"image": images, "label": labels}
    for op in self.batch_ops:
      out = op(out, batch_rng)
    return out


def train_pipeline(config) -> Pipeline:
  """The training preprocessing `data.pp_train` of the data node `config`; ValueError naming the
  op for a bad string (no dataset needed)."""
  return Pipeline(config.pp_train, "data.pp_train", config)


def eval_pipeline(spec: str, field: str, config) -> Pipeline:
  """An evaluation's preprocessing `spec` (the config field `field`, e.g. 'evals.val.pp') with
  the data node `config`'s image size, channels and normalization; ValueError naming the field
  and op for a bad string or a random op (evaluation is deterministic)."""
  evaluation = Pipeline(spec, field, config)
  random = [type(op).__name__ for op in evaluation.ops if op.random]
  if random:
    raise ValueError(f"{field}={spec!r} has random ops {random}: evaluation must be "
                     f"deterministic")
  return evaluation
