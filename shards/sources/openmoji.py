"""`--source openmoji`: the OpenMoji set, a second emoji artwork with its own words, from the npm registry.

    npm pack openmoji@17.0.0 && tar xzf openmoji-17.0.0.tgz      # unpacks to ./package
    python -m shards build --source openmoji --openmoji-dir package --out data/openmoji --name openmoji

Pictures: the package's colour SVGs (`color/svg/HEXCODE.svg`, drawn by the OpenMoji project, not Google's
Noto glyphs), rasterised by PyMuPDF onto white. Words: `data/openmoji.json` gives each emoji its CLDR
annotation ("grinning face"), the CLDR keywords ("cheerful, face, grin, happy, ...") and the OpenMoji
authors' own tags; the 540-odd OpenMoji extras (not Unicode emoji: "spouting orca", brand and map symbols)
have an annotation and OpenMoji tags only. Ground truth that is not a caption word: each emoji's group and
subgroup in the same file, stored as the sample's "objects" for the plausible-match metric (PMRP).

Captions, `--openmoji-captions` (5) per picture, all distinct: the annotation, the CLDR keywords, the
OpenMoji tags (each list as one comma-separated caption, as the annotators wrote them), then the annotation
in the emoji corpus's frames. Skin-tone swatches and hair components (group "component") are left out.

Splits: by the emoji corpus's variant-safe hash of the base emoji (skin tone, gender and hair stripped;
shards.emoji_corpus.base_key), so an emoji falls in the same split in both corpora.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from PIL import Image

from shards.builtin_corpus import encode_png
from shards.emoji_corpus import (
    SPLITS,
    ascii_words,
    base_key,
    bounded,
    framed_captions,
    group_objects,
    split_of,
    unit_hash,
)
from shards.sources.base import BadSample, InputError, Item, Problems, Source, read_json_file, require

MIN_IMAGE_SIZE = 16
LEFT_OUT_GROUPS = frozenset({"component"})  # skin-tone swatches and hair pieces: parts, not pictures
PACKAGE_HINT = "npm pack openmoji@17.0.0 && tar xzf openmoji-17.0.0.tgz (then --openmoji-dir package)"


@dataclass(frozen=True)
class OpenMojiEntry:
    hexcode: str
    annotation: str  # caption form: "waving hand medium light skin tone"
    keywords: tuple[str, ...]  # CLDR keywords (Unicode emoji only)
    tags: tuple[str, ...]  # the OpenMoji authors' tags
    base: str  # the variants of one emoji share it
    group: str
    subgroup: str

    @property
    def image_id(self) -> str:
        return "openmoji-" + self.hexcode.lower()

    @property
    def objects(self) -> list[dict]:
        """Plausible-match ground truth, as in the emoji corpus: one class for the group, one for the subgroup."""
        return group_objects(self.group, self.subgroup, self.image_id)


def caption_form(text: str) -> str:
    """'waving hand: medium-light skin tone' -> 'waving hand medium light skin tone', 'pi\u00f1ata' -> 'pinata'."""
    for mark in (":", "-", "_"):
        text = text.replace(mark, " ")
    return ascii_words(text)


def _word_list(text: str) -> tuple[str, ...]:
    words = (caption_form(w) for w in (text or "").split(","))
    return tuple(dict.fromkeys(w for w in words if w))  # in the annotators' order, repeats dropped


def captions_for(entry: OpenMojiEntry, count: int) -> list[str]:
    """`count` distinct captions: annotation, keywords, tags, then the annotation in frames (hash-ordered)."""
    texts = (entry.annotation, ", ".join(entry.keywords), ", ".join(entry.tags))
    return framed_captions(texts, entry.annotation, entry.hexcode, count)


def read_catalogue(package: Path) -> list[OpenMojiEntry]:
    """The package's emoji in its own order, components left out; a record without a hexcode is refused."""
    path = package / "data" / "openmoji.json"
    if not package.is_dir():
        raise InputError(f"--openmoji-dir {package} is not a folder; get the package with: {PACKAGE_HINT}")
    records = read_json_file(path, "the OpenMoji table")
    if not isinstance(records, list):
        raise InputError(f"{path}: expected a JSON list of emoji records, got {type(records).__name__}")
    entries = []
    for index, record in enumerate(records):
        if not isinstance(record, dict) or not record.get("hexcode") or not isinstance(record["hexcode"], str):
            raise InputError(f"{path}: record {index} has no hexcode")
        if record.get("group") in LEFT_OUT_GROUPS:
            continue
        glyph = record.get("emoji") or record["hexcode"]
        entries.append(OpenMojiEntry(
            record["hexcode"], caption_form(record.get("annotation") or ""), _word_list(record.get("tags")),
            _word_list(record.get("openmoji_tags")), base_key(glyph), str(record.get("group") or ""),
            str(record.get("subgroups") or "")))
    return entries


def render_svg(svg: bytes, image_size: int, where: str) -> bytes:
    """An SVG drawn onto a white image_size square, as PNG bytes; an SVG PyMuPDF cannot draw is corrupt_image."""
    import pymupdf  # only this source needs it (the `corpora` extra)

    try:
        with pymupdf.open(stream=svg, filetype="svg") as doc:
            page = doc[0]
            zoom = image_size / max(page.rect.width, page.rect.height)
            pix = page.get_pixmap(matrix=pymupdf.Matrix(zoom, zoom), alpha=True)
            layer = Image.frombytes("RGBA", (pix.width, pix.height), pix.samples)
    except (RuntimeError, ValueError) as e:  # pymupdf's FileDataError is a RuntimeError
        raise BadSample("corrupt_image", f"{where}: not a drawable SVG ({e})") from None
    square = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    square.paste(layer, ((image_size - layer.width) // 2, (image_size - layer.height) // 2), layer)
    return encode_png(square)


def _loader(svg_path: Path, image_size: int):
    def load() -> bytes:
        try:
            svg = svg_path.read_bytes()
        except FileNotFoundError:
            raise BadSample("missing_image", f"{svg_path} does not exist") from None
        return render_svg(svg, image_size, str(svg_path))
    return load


def items(args: argparse.Namespace, problems: Problems) -> Iterator[Item]:
    if args.openmoji_val_fraction + args.openmoji_test_fraction >= 1.0:
        raise InputError(f"--openmoji-val-fraction {args.openmoji_val_fraction} + --openmoji-test-fraction "
                         f"{args.openmoji_test_fraction} leave nothing to train on; their sum must be < 1")
    package = Path(require(args.openmoji_dir, "--openmoji-dir", "openmoji"))
    entries = read_catalogue(package)
    if args.openmoji_limit:
        entries = sorted(entries, key=lambda e: unit_hash("order:" + e.hexcode))[:args.openmoji_limit]
    by_split: dict[str, list[OpenMojiEntry]] = {split: [] for split in SPLITS}
    for entry in entries:
        by_split[split_of(entry.base, args.openmoji_val_fraction, args.openmoji_test_fraction)].append(entry)
    for split, chosen in by_split.items():
        for entry in chosen:
            yield Item(entry.image_id, split, captions_for(entry, args.openmoji_captions),
                       where=f"{split} sample {entry.image_id}",
                       load=_loader(package / "color" / "svg" / f"{entry.hexcode}.svg", args.openmoji_image_size),
                       objects=entry.objects)


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--openmoji-dir", help=f"the unpacked npm package ({PACKAGE_HINT})")
    group.add_argument("--openmoji-image-size", type=bounded(int, MIN_IMAGE_SIZE, None), default=64,
                       help="side of the square pictures in pixels")
    group.add_argument("--openmoji-captions", type=bounded(int, 1, None), default=5, help="captions per picture")
    group.add_argument("--openmoji-val-fraction", type=bounded(float, 0.0, 1.0), default=0.1,
                       help="share of the variant groups in the val split")
    group.add_argument("--openmoji-test-fraction", type=bounded(float, 0.0, 1.0), default=0.1,
                       help="share of the variant groups in the test split")
    group.add_argument("--openmoji-limit", type=bounded(int, 0, None), default=0,
                       help="keep this many emoji, spread over the set (0: all)")


SOURCE = Source(add_arguments, items)
