"""Issue 26: two builds of the same input are byte-identical, a skipped corrupt picture included (PIL names the
bytes it cannot identify with their memory address, which the manifest must not record)."""
from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

from PIL import Image

from shards.__main__ import main as shards_main


def _set_digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir()) if p.is_file()
            and not p.name.startswith("build")}


def test_two_builds_with_a_corrupt_picture_are_byte_identical(tmp_path):
    pics = tmp_path / "pics"
    pics.mkdir()
    rows = [["image", "caption"]]
    for i, colour in enumerate(["red", "green", "blue", "yellow"]):
        out = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(out, format="PNG")
        (pics / f"{colour}.png").write_bytes(out.getvalue())
        rows += [[f"{colour}.png", f"a {colour} square number {i}"], [f"{colour}.png", f"the {colour} box"]]
    (pics / "broken.png").write_bytes(b"\x89PNG not a picture at all")
    rows.append(["broken.png", "a broken picture"])
    table = tmp_path / "pairs.csv"
    with table.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    digests = []
    for name in ("a", "b"):
        code = shards_main(["build", "--source", "csv", "--table", str(table), "--images", str(pics),
                            "--out", str(tmp_path / name), "--spacy-pipeline", "blank", "--min-concept-count", "1"])
        assert code in (0, None)
        digests.append(_set_digest(tmp_path / name))
    manifest = (tmp_path / "a" / "manifest.json").read_text()
    assert "broken" in manifest and "object at 0x" not in manifest  # the skip is recorded by its source
    assert digests[0] == digests[1]
