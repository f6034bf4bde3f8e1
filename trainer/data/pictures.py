"""Pictures to pixels: how every picture becomes the square, normalised tensor the image encoders read.

One function serves training (trainer.data's stream), evaluation, trainer.extract_features and trainer.retrieve
(through trainer.data.decode.decode_image), so a picture is seen the same way wherever it is read:
- a picture with transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited on white
  first: `convert("RGB")` alone keeps whatever colour the transparent pixels hide (black or noise in real clip art);
- its aspect ratio is kept: the short side is resized to the target and the centre cropped (evaluation, and
  training by default), or with `crop` a random part of it (random resized crop, training only). Never a
  horizontal flip: captions say "left" and "right";
- a JPEG much larger than the target is decoded at a reduced scale (PIL `draft`: 1/2, 1/4 or 1/8 of the pixels
  per side, at most what keeps the target's resolution), which is most of the cost of a large photograph.
Pixel values become (p - PIXEL_MEAN) / PIXEL_STD (trainer.data.pixels, a leaf the model imports without PIL).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps

from trainer.data.pixels import PIXEL_MEAN, PIXEL_STD

WHITE = (255, 255, 255)


@dataclass(frozen=True)
class RandomCrop:
    """Random resized crop: a part of min_area..1 of the picture's area, aspect ratio 3/4..4/3 (log-uniform)."""

    min_area: float = 0.5
    ratios: tuple[float, float] = (3 / 4, 4 / 3)


def has_transparency(img: Image.Image) -> bool:
    return img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info


def on_white(img: Image.Image) -> Image.Image:
    """RGB, with transparent pixels composited on a white background."""
    if not has_transparency(img):
        return img if img.mode == "RGB" else img.convert("RGB")
    rgba = img.convert("RGBA")
    background = Image.new("RGB", rgba.size, WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def centre_box(width: int, height: int) -> tuple[float, float, float, float]:
    """The largest centred square: what a short-side resize followed by a centre crop keeps."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def random_box(width: int, height: int, crop: RandomCrop, rng: random.Random) -> tuple[float, float, float, float]:
    """A random part of the picture (area fraction and aspect ratio as `crop` says); the centre square when ten
    draws do not fit (a very long picture)."""
    area = width * height
    log_lo, log_hi = math.log(crop.ratios[0]), math.log(crop.ratios[1])
    for _ in range(10):
        target = area * rng.uniform(crop.min_area, 1.0)
        ratio = math.exp(rng.uniform(log_lo, log_hi))
        w, h = math.sqrt(target * ratio), math.sqrt(target / ratio)
        if w <= width and h <= height:
            left, top = rng.uniform(0, width - w), rng.uniform(0, height - h)
            return left, top, left + w, top + h
    return centre_box(width, height)


def draft_size(size: int, crop: RandomCrop | None) -> int:
    """The smallest side a JPEG may be decoded at: the target, or more when only a part of it is kept."""
    return size if crop is None else math.ceil(size / math.sqrt(crop.min_area))


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB picture -> (p / 255 - PIXEL_MEAN) / PIXEL_STD as float [3, H, W], in two passes over the pixels."""
    width, height = img.size
    pixels = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(height, width, 3)
    out = pixels.permute(2, 0, 1).float()
    return out.mul_(1.0 / (255.0 * PIXEL_STD)).sub_(PIXEL_MEAN / PIXEL_STD)


def picture_tensor(img: Image.Image, size: int, crop: RandomCrop | None = None,
                   rng: random.Random | None = None) -> torch.Tensor:
    """An opened (not yet decoded) picture -> normalised float tensor [3, size, size]. crop (with rng): a random
    resized crop instead of the centre one."""
    if img.format == "JPEG":
        want = draft_size(size, crop)
        img.draft(img.mode, (want, want))  # decodes at 1/2..1/8 scale while both sides stay >= want
    if img.getexif().get(0x0112, 1) != 1:  # EXIF orientation: a phone photo stored on its side
        img = ImageOps.exif_transpose(img)
    img = on_white(img)
    width, height = img.size
    box = random_box(width, height, crop, rng or random.Random()) if crop is not None else centre_box(width, height)
    if box != (0, 0, size, size) or img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR, box=box)
    return to_tensor(img)
