"""Real pictures decoded right (issue 13): transparency on white, aspect ratio kept, JPEG draft, one decoder for
training, evaluation, feature extraction and retrieval."""
import io
import random

import numpy as np
import pytest
import torch
from PIL import Image, JpegImagePlugin

from trainer.data.decode import decode_image
from trainer.data.pictures import RandomCrop
from trainer.data.pixels import PIXEL_MEAN, PIXEL_STD


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    out = io.BytesIO()
    img.save(out, format=fmt, **kw)
    return out.getvalue()


def rgb(x: torch.Tensor) -> torch.Tensor:
    """Back to [0, 255] values, [S, S, 3]."""
    return (x * PIXEL_STD + PIXEL_MEAN).mul(255).round().permute(1, 2, 0)


def half_transparent_rgba() -> Image.Image:
    """Left half opaque red; right half fully transparent with a hidden black colour (as real clip art has)."""
    pixels = np.zeros((64, 64, 4), dtype=np.uint8)
    pixels[:, :32] = (255, 0, 0, 255)
    pixels[:, 32:] = (0, 0, 0, 0)
    return Image.fromarray(pixels, "RGBA")


def test_transparent_pixels_of_an_rgba_picture_become_white():
    out = rgb(decode_image(encode(half_transparent_rgba()), 64))
    assert torch.equal(out[:, 40:], torch.full_like(out[:, 40:], 255))  # white, not the hidden black
    assert torch.equal(out[:, :24], torch.tensor([255.0, 0, 0]).expand(64, 24, 3))
    # what convert("RGB") alone gives: the hidden black
    plain = np.asarray(Image.open(io.BytesIO(encode(half_transparent_rgba()))).convert("RGB"))
    assert (plain[:, 40:] == 0).all()


def test_a_palette_picture_with_a_transparent_colour_and_a_grey_alpha_one_become_white():
    pal = Image.new("P", (64, 64), 0)
    pal.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black (transparent), 1 blue
    pal.paste(1, (0, 0, 32, 64))
    data = encode(pal, transparency=0)
    assert "transparency" in Image.open(io.BytesIO(data)).info
    out = rgb(decode_image(data, 64))
    assert torch.equal(out[:, 40:], torch.full_like(out[:, 40:], 255))
    assert torch.equal(out[:, :24], torch.tensor([0.0, 0, 255]).expand(64, 24, 3))

    la = Image.fromarray(np.stack([np.full((64, 64), 30, np.uint8), np.zeros((64, 64), np.uint8)], -1), "LA")
    assert rgb(decode_image(encode(la), 32)).eq(255).all()


def test_aspect_ratio_is_kept_short_side_resized_and_centre_cropped():
    """A 300x100 picture, black with a green band in its middle third: the centre square is all band. A squashing
    resize would show black at both sides."""
    pixels = np.zeros((100, 300, 3), dtype=np.uint8)
    pixels[:, 100:200] = (0, 255, 0)
    out = rgb(decode_image(encode(Image.fromarray(pixels)), 32))
    assert out.shape == (32, 32, 3)
    assert torch.equal(out[:, 1:-1], torch.tensor([0.0, 255, 0]).expand(32, 30, 3))
    assert out[..., 1].min() > 200  # the edge columns blend a little of the black beyond the crop (filter support)
    # a round disc stays round: its width equals its height after decoding a wide picture
    img = Image.new("RGB", (400, 200), "white")
    from PIL import ImageDraw
    ImageDraw.Draw(img).ellipse((150, 50, 250, 150), fill="black")
    dark = rgb(decode_image(encode(img), 64))[..., 0] < 128
    rows, cols = dark.any(1).sum().item(), dark.any(0).sum().item()
    assert abs(rows - cols) <= 1 and rows > 20


def test_random_resized_crop_is_an_option_drawn_from_the_stream_rng():
    pixels = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels))
    crop = RandomCrop(min_area=0.3)
    a = decode_image(data, 32, crop=crop, rng=random.Random(1))
    again = decode_image(data, 32, crop=crop, rng=random.Random(1))
    other = decode_image(data, 32, crop=crop, rng=random.Random(2))
    assert torch.equal(a, again) and not torch.equal(a, other)
    assert not torch.equal(a, decode_image(data, 32))  # off by default: the centre crop
    # no horizontal flip: many draws of crops of a left-dark / right-light picture keep dark on the left
    half = np.zeros((100, 100, 3), dtype=np.uint8)
    half[:, 50:] = 255
    data = encode(Image.fromarray(half))
    rng = random.Random(0)
    for _ in range(20):
        out = rgb(decode_image(data, 32, crop=RandomCrop(min_area=0.9), rng=rng))
        assert out[:, 0].mean() <= out[:, -1].mean()


def test_large_jpegs_are_decoded_at_reduced_size(monkeypatch):
    sizes = []
    draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = draft(self, mode, size)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 2000, 3), dtype=np.uint8))
    out = decode_image(encode(photo, "JPEG", quality=80), 224)
    assert out.shape == (3, 224, 224)
    assert sizes == [(500, 375)]  # 1/4 scale: the largest that keeps both sides >= 224
    sizes.clear()
    decode_image(encode(photo.resize((300, 240)), "JPEG"), 224)
    assert sizes == [(300, 240)]  # not much larger than the target: full size


def test_feature_extraction_and_retrieval_use_the_same_decoder():
    import trainer.data.decode as decode
    import trainer.retrieval.query as query
    import trainer.tools.extract_features as extract

    # trainer.retrieve's picture queries decode through trainer.retrieval.query
    assert query.decode_image is decode.decode_image
    assert extract.decode_image_input is decode.decode_image_input
    png = encode(half_transparent_rgba())
    sample = {"__key__": "k", "png": png}
    assert torch.equal(decode.decode_image_input(sample, 32, None), decode.decode_image(png, 32))


@pytest.mark.parametrize("mode", ["L", "CMYK", "I;16"])
def test_other_modes_decode_to_three_channels(mode):
    img = Image.new(mode, (40, 30))
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    assert decode_image(encode(img, fmt), 16).shape == (3, 16, 16)


def test_random_crop_is_a_typed_config_key_off_by_default_and_reaches_the_stream(tiny_shards):
    from pathlib import Path

    from trainer.config import ConfigError, load_config
    from trainer.data.shardset import ShardSet
    from trainer.training.factory import build_train_stream

    builtin = Path(__file__).resolve().parents[3] / "configs" / "builtin.yaml"
    cfg = load_config(builtin, [f"data.shards={tiny_shards}"])
    assert cfg.data.random_crop is False
    assert build_train_stream(cfg, ShardSet.open(tiny_shards), rank=0, world_size=1).settings.crop is None
    cfg = load_config(builtin, [f"data.shards={tiny_shards}", "data.random_crop=true",
                                "data.random_crop_min_area=0.3"])
    assert build_train_stream(cfg, ShardSet.open(tiny_shards), rank=0, world_size=1).settings.crop == RandomCrop(0.3)
    with pytest.raises(ConfigError, match=r"data.random_crop_min_area: must be in \(0, 1\]"):
        load_config(builtin, [f"data.shards={tiny_shards}", "data.random_crop_min_area=1.5"])
