"""What the image encoder reads, decoded from a sample's bytes: a picture as a normalised tensor [3, S, S]
(trainer.data.pictures, trainer.data.pixels), or precomputed region features [R, D] (`npy`, float16, no pickles)
checked against the model's RegionSpec; pictures larger than a bound are refused from their header alone. Also
the check, before training, that a shard set holds what the model reads."""
from __future__ import annotations

import io
import random
import re
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from shards.format import PICTURE_EXTS
from trainer.data.pictures import RandomCrop, picture_tensor
from trainer.data.samples import BadSample, picture_bytes
from trainer.data.shardset import ShardSet

Image.MAX_IMAGE_PIXELS = 64_000_000  # a decompression bomb is refused, not decoded
# PIL names the bytes it cannot identify by their repr, a memory address that would differ in every message
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def picture_error(e: Exception) -> str:
    """PIL's error without the object's address."""
    return _OBJECT_REPR.sub("its bytes", str(e))


def _open_picture(data: bytes, key: str) -> Image.Image:
    """PIL opens lazily: size and mode are known from the header, before any pixel is decoded."""
    try:
        return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadSample(f"{key}: picture too large: {e}", "image_too_large") from e


def _refuse_oversized(img: Image.Image, max_pixels: int, key: str) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise BadSample(f"{key}: picture of {width}x{height} pixels exceeds data.max_image_pixels={max_pixels}",
                        "image_too_large")


def check_picture_size(data: bytes, max_pixels: int, key: str) -> None:
    """Refuse a picture larger than max_pixels from its header alone, without decoding it."""
    try:
        with _open_picture(data, key) as img:
            _refuse_oversized(img, max_pixels, key)
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for broken pictures
        raise BadSample(f"{key}: undecodable picture: {picture_error(e)}", "undecodable_image") from e


@dataclass(frozen=True)
class RegionSpec:
    """What region features must look like for the model: [1..max_regions, dim]."""

    dim: int
    max_regions: int

    @classmethod
    def from_config(cls, cfg) -> "RegionSpec | None":
        """The spec of a `regions` model (trainer.config.Config), None for models that read pictures."""
        m = cfg.model
        return cls(m.region_dim, m.max_regions) if m.image_encoder == "regions" else None


def decode_features(data: bytes, key: str, spec: RegionSpec) -> torch.Tensor:
    """`npy` bytes (np.save of float16 [regions, dim]; no pickles) -> float16 tensor [regions, dim], checked."""
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises several types for a malformed file
        raise BadSample(f"{key}: unreadable npy region features: {e}", "undecodable_image") from e
    if array.ndim != 2 or array.shape[0] < 1 or not np.issubdtype(array.dtype, np.floating):
        raise BadSample(f"{key}: region features must be a float [regions, dim] array, got {array.dtype} "
                        f"{list(array.shape)}", "undecodable_image")
    regions, dim = array.shape
    if dim != spec.dim:
        raise BadSample(f"{key}: region features have dim {dim}, the model expects model.region_dim={spec.dim}",
                        "undecodable_image")
    if regions > spec.max_regions:
        raise BadSample(f"{key}: {regions} regions, more than model.max_regions={spec.max_regions}",
                        "undecodable_image")
    with np.errstate(over="ignore"):  # an overflow becomes inf, refused just below
        array = array.astype(np.float16)
    if not np.isfinite(array).all():
        raise BadSample(f"{key}: region features hold inf or NaN (in float16)", "undecodable_image")
    return torch.from_numpy(array)


def decode_image(data: bytes, image_size: int, max_pixels: int | None = None, key: str = "picture",
                 crop: RandomCrop | None = None, rng: random.Random | None = None) -> torch.Tensor:
    """Picture bytes -> normalised float tensor [3, S, S] as trainer.data.pixels.picture_tensor makes it (transparency
    on white, aspect kept, JPEG draft; crop: random resized crop drawn with rng). With max_pixels a larger
    picture (a decompression bomb) is refused from its header, before decoding."""
    with _open_picture(data, key) as img:
        if max_pixels is not None:
            _refuse_oversized(img, max_pixels, key)
        return picture_tensor(img, image_size, crop, rng)


def decode_image_input(sample: dict, image_size: int, regions: RegionSpec | None,
                       max_pixels: int | None = None, crop: RandomCrop | None = None,
                       rng: random.Random | None = None) -> torch.Tensor:
    """The sample's picture [3, S, S], or with `regions` its features [R, D]: what the image encoder reads.
    max_pixels, crop, rng: see decode_image."""
    key = f"{sample.get('__key__', '?')} in {sample.get('__url__', '?')}"
    if regions is not None:
        if "npy" not in sample:
            raise BadSample(f"{key}: no npy region features (model.image_encoder=regions reads feature shards, "
                            f"e.g. from `python -m trainer.extract_features`)", "missing_image")
        return decode_features(sample["npy"], key, regions)
    try:
        return decode_image(picture_bytes(sample), image_size, max_pixels, key, crop, rng)
    except BadSample:
        raise
    except Exception as e:  # PIL raises many types for broken pictures
        raise BadSample(f"{key}: undecodable picture: {picture_error(e)}", "undecodable_image") from e


def check_image_input(shardset: ShardSet, split: str, regions: RegionSpec | None) -> None:
    """Reads the split's first sample and refuses, before training starts, a shard set whose samples do not hold
    what the model reads (pictures vs npy region features; the feature size)."""
    first = next(iter(wds.tarfile_to_samples()([{"url": shardset.urls(split)[0]}])), None)
    if first is None:
        raise ValueError(f"split {split!r} of {shardset.root}: its first shard holds no sample")
    has_features = "npy" in first
    where = f"{shardset.root} (split {split!r}, sample {first.get('__key__')})"
    if regions is None and has_features and not any(ext in first for ext in PICTURE_EXTS):
        raise ValueError(f"{where} holds npy region features, not pictures: use model.image_encoder=regions")
    if regions is not None:
        if not has_features:
            raise ValueError(f"{where} holds pictures, not npy region features: model.image_encoder=regions needs "
                             f"a feature shard set (python -m trainer.extract_features)")
        decode_features(first["npy"], where, regions)  # BadSample (a ValueError) names a wrong size
