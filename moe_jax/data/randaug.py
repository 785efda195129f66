"""RandAugment (Cubuk et al. 2020) on PIL images, with big_vision's op set and magnitudes.

big_vision's `randaug(num_layers, magnitude)` is the TF TPU AutoAugment code
(`autoaugment.distort_image_with_randaugment`): `num_layers` times, pick one of the 16 ops below
uniformly and apply it with probability `uniform(0.2, 0.8)`, at the fixed `magnitude` (level in
[0, 10]; larger levels extrapolate, as there). Arguments per level (`_MAX_LEVEL = 10`):
Rotate 30°·l/10, Shear 0.3·l/10, Translate 100 px·l/10 (signs random), Posterize int(4·l/10) bits
kept, Solarize threshold int(256·l/10), SolarizeAdd +int(110·l/10) below 128, Color / Contrast /
Brightness / Sharpness factor 1.8·l/10 + 0.1, Cutout square of half-side int(40·l/10).
Geometric ops and Cutout fill with grey 128, nearest interpolation, as there. The PIL ops are
the same maths as the TF ones (PIL's Sharpness uses the same 3x3 smoothing kernel); only the
random streams differ.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageOps

MAX_LEVEL = 10.0
FILL = 128
TRANSLATE_PIXELS = 100
CUTOUT_HALF_SIDE = 40


def _signed(value: float, rng: np.random.Generator) -> float:
  return value if rng.random() < 0.5 else -value


def _fill(image: Image.Image):
  return (FILL,) * len(image.getbands())


def _affine(image: Image.Image, coeffs: tuple[float, ...]) -> Image.Image:
  return image.transform(image.size, Image.Transform.AFFINE, coeffs, Image.Resampling.NEAREST,
                         fillcolor=_fill(image))


def _solarize_add(image: Image.Image, addition: int, threshold: int = 128) -> Image.Image:
  lut = [min(255, i + addition) if i < threshold else i for i in range(256)]
  return image.point(lut * len(image.getbands()))


def _cutout(image: Image.Image, half_side: int, rng: np.random.Generator) -> Image.Image:
  w, h = image.size
  cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
  image = image.copy()
  box = (max(0, cx - half_side), max(0, cy - half_side),
         min(w, cx + half_side) - 1, min(h, cy + half_side) - 1)
  if box[2] >= box[0] and box[3] >= box[1]:
    ImageDraw.Draw(image).rectangle(box, fill=_fill(image))
  return image


def _enhance(enhancer) -> Callable:
  return lambda image, level, rng: enhancer(image).enhance(level / MAX_LEVEL * 1.8 + 0.1)


# name -> f(image, level, rng) -> image
OPS: dict[str, Callable[[Image.Image, float, np.random.Generator], Image.Image]] = {
    "AutoContrast": lambda image, level, rng: ImageOps.autocontrast(image),
    "Equalize": lambda image, level, rng: ImageOps.equalize(image),
    "Invert": lambda image, level, rng: ImageOps.invert(image),
    "Rotate": lambda image, level, rng: image.rotate(
        _signed(level / MAX_LEVEL * 30.0, rng), Image.Resampling.NEAREST, fillcolor=_fill(image)),
    "Posterize": lambda image, level, rng: ImageOps.posterize(
        image, min(8, int(level / MAX_LEVEL * 4))),
    "Solarize": lambda image, level, rng: ImageOps.solarize(image, int(level / MAX_LEVEL * 256)),
    "Color": _enhance(ImageEnhance.Color),
    "Contrast": _enhance(ImageEnhance.Contrast),
    "Brightness": _enhance(ImageEnhance.Brightness),
    "Sharpness": _enhance(ImageEnhance.Sharpness),
    "ShearX": lambda image, level, rng: _affine(
        image, (1, _signed(level / MAX_LEVEL * 0.3, rng), 0, 0, 1, 0)),
    "ShearY": lambda image, level, rng: _affine(
        image, (1, 0, 0, _signed(level / MAX_LEVEL * 0.3, rng), 1, 0)),
    "TranslateX": lambda image, level, rng: _affine(
        image, (1, 0, _signed(level / MAX_LEVEL * TRANSLATE_PIXELS, rng), 0, 1, 0)),
    "TranslateY": lambda image, level, rng: _affine(
        image, (1, 0, 0, 0, 1, _signed(level / MAX_LEVEL * TRANSLATE_PIXELS, rng))),
    "Cutout": lambda image, level, rng: _cutout(image, int(level / MAX_LEVEL * CUTOUT_HALF_SIDE),
                                                rng),
    "SolarizeAdd": lambda image, level, rng: _solarize_add(image, int(level / MAX_LEVEL * 110)),
}
OP_NAMES = tuple(OPS)


def randaugment(image: Image.Image, num_layers: int, magnitude: float,
                rng: np.random.Generator) -> Image.Image:
  """`num_layers` ops drawn uniformly from OP_NAMES, each applied with probability
  `uniform(0.2, 0.8)` at level `magnitude` (see the module docstring)."""
  for _ in range(num_layers):
    name = OP_NAMES[int(rng.integers(len(OP_NAMES)))]
    if rng.random() < rng.uniform(0.2, 0.8):
      image = OPS[name](image, magnitude, rng)
  return image
