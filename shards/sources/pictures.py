"""Checking picture bytes without changing them, and shrinking them only when asked (`--max-side`).

Pictures keep their original bytes and format: a source's jpg goes into the shard byte for byte. A picture
is accepted when PIL can verify and fully decode it (JPEG's verify() checks nothing, so decoding is what
finds a truncated file); decoding happens at a reduced scale where the codec allows it, which still reads
every byte of the stream.
"""
from __future__ import annotations

import io
import re

from PIL import Image

from shards.sources.base import BadSample

# PIL format name -> shard extension (the trainer decodes all three)
FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_SAVE_OPTIONS = {"JPEG": {"quality": 95}, "PNG": {"optimize": False}, "WEBP": {"quality": 95}}
_CHECK_SIDE = 64  # decode JPEGs at about this size: the whole stream is still parsed
# PIL names the bytes it cannot identify by their repr ("<_io.BytesIO object at 0x7f...>"): a memory address that
# would make two builds of the same input record different reasons in their manifests
_OBJECT_REPR = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")


def error_reason(e: Exception) -> str:
    """PIL's error as a reason that is the same in every build: the object repr becomes "its bytes"."""
    return f"{type(e).__name__}: {_OBJECT_REPR.sub('its bytes', str(e))}"


def _decode_check(data: bytes) -> str:
    """The PIL format of decodable picture bytes; BadSample("corrupt_image") otherwise."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            # PIL only warns between 1x and 2x its pixel limit; a picture that large is refused here
            # (checked by hand: warning filters are process-wide, and checks run in threads)
            if Image.MAX_IMAGE_PIXELS and img.width * img.height > Image.MAX_IMAGE_PIXELS:
                raise BadSample("corrupt_image", f"{img.width}x{img.height} pixels is over the limit of "
                                f"{Image.MAX_IMAGE_PIXELS} (a decompression bomb?)")
            img.verify()
            fmt = img.format
        with Image.open(io.BytesIO(data)) as img:
            img.draft("RGB", (_CHECK_SIDE, _CHECK_SIDE))
            img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise BadSample("corrupt_image", f"not a decodable picture ({error_reason(e)})") from None
    return fmt


def _format(data: bytes) -> str:
    """The PIL format from the header alone (for pictures verified earlier)."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except (OSError, ValueError) as e:
        raise BadSample("corrupt_image", f"not a picture ({error_reason(e)})") from None


def needs_resize(data: bytes, max_side: int | None) -> bool:
    """Whether --max-side shrinks this picture (its header alone is read)."""
    if max_side is None:
        return False
    with Image.open(io.BytesIO(data)) as img:
        return max(img.size) > max_side


def checked_picture(data: bytes, max_side: int | None = None, verify: bool = True) -> tuple[bytes, str, bool]:
    """(bytes, extension, resized): the original bytes unless `max_side` asks for a smaller picture.

    verify=False only reads the header: for bytes that passed a full check before.
    """
    if not data:
        raise BadSample("corrupt_image", "empty picture file")
    fmt = _decode_check(data) if verify else _format(data)
    if fmt not in FORMAT_EXT:
        raise BadSample("corrupt_image", f"picture format {fmt} is not one of {', '.join(FORMAT_EXT)}")
    if max_side is None:
        return data, FORMAT_EXT[fmt], False
    if not needs_resize(data, max_side):
        return data, FORMAT_EXT[fmt], False
    with Image.open(io.BytesIO(data)) as img:
        scale = max_side / max(img.size)
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img.draft("RGB", size)  # JPEG: decode at the smallest DCT scale still >= size (much faster)
        keep_alpha = fmt != "JPEG" and ("A" in img.getbands() or img.mode == "P")
        small = img.convert("RGBA" if keep_alpha else "RGB").resize(size, Image.LANCZOS)
    out = io.BytesIO()
    small.save(out, format=fmt, **_SAVE_OPTIONS[fmt])
    return out.getvalue(), FORMAT_EXT[fmt], True
