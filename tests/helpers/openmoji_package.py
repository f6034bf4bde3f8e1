"""An OpenMoji-like npm package for tests: real emoji with their CLDR names and Unicode groups (from the Noto
font's catalogue, as the emoji corpus reads it), each drawn as a coloured circle in an SVG of the package's layout
(data/openmoji.json, color/svg/HEXCODE.svg). Large enough for train, val and test splits; no download."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from shards.emoji_corpus import FONT_PATH, select

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
       '<circle cx="36" cy="36" r="{r}" fill="#{fill}"/></svg>')


def emoji_like_package(root: Path, count: int = 120) -> Path:
    records = []
    (root / "data").mkdir(parents=True)
    (root / "color" / "svg").mkdir(parents=True)
    for entry in select(str(FONT_PATH), count):
        hexcode = "-".join(f"{ord(ch):X}" for ch in entry.glyph)
        records.append({"emoji": entry.glyph, "hexcode": hexcode,
                        "group": entry.unicode_group.lower().replace(" & ", "-").replace(" ", "-"),
                        "subgroups": entry.unicode_subgroup, "annotation": entry.name,
                        "tags": ", ".join(entry.aliases), "openmoji_tags": ""})
        digest = hashlib.sha256(hexcode.encode()).hexdigest()
        (root / "color" / "svg" / f"{hexcode}.svg").write_text(SVG.format(r=12 + int(digest[:2], 16) % 24,
                                                                          fill=digest[2:8]))
    (root / "data" / "openmoji.json").write_text(json.dumps(records), encoding="utf-8")
    return root
