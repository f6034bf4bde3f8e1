"""The OpenMoji source on a small package laid out like the npm one: captions from the annotators' words, ground
truth from the groups, variant-safe splits, SVGs drawn onto white, bad SVGs skipped and counted."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shards.__main__ import main
from shards.emoji_corpus import base_key, split_of
from shards.sources.openmoji import OpenMojiEntry, caption_form, captions_for, read_catalogue, render_svg

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 72 72">'
       '<circle cx="36" cy="36" r="{r}" fill="{fill}"/></svg>')
SKIN = "\U0001F3FD"


def _record(emoji: str, hexcode: str, annotation: str, group: str, subgroup: str, tags: str = "",
            openmoji_tags: str = "") -> dict:
    return {"emoji": emoji, "hexcode": hexcode, "group": group, "subgroups": subgroup, "annotation": annotation,
            "tags": tags, "openmoji_tags": openmoji_tags}


RECORDS = [
    _record("\U0001F600", "1F600", "grinning face", "smileys-emotion", "face-smiling",
            "face, grin, grinning, happy", "smile, happy"),
    _record("\U0001F622", "1F622", "crying face", "smileys-emotion", "face-concerned", "cry, face, sad, tear"),
    _record("\U0001F44D", "1F44D", "thumbs up", "people-body", "hand-fingers-closed", "hand, thumb, up, yes"),
    _record("\U0001F44D" + SKIN, "1F44D-1F3FD", "thumbs up: medium skin tone", "people-body",
            "hand-fingers-closed", "hand, medium skin tone, thumb, up, yes"),
    _record("\U0001F3FD", "1F3FD", "medium skin tone", "component", "skin-tone", "skin tone"),
    _record("", "E000", "spouting-orca", "extras-openmoji", "animal", "", "whale, orca, water"),
    _record("\U0001F34E", "1F34E", "red apple", "food-drink", "food-fruit", "apple, fruit, red"),  # no SVG
    _record("\U0001F34F", "1F34F", "green apple", "food-drink", "food-fruit", "apple, fruit, green"),  # bad SVG
]
FILLS = {"1F600": "#fcea2b", "1F622": "#92d3f5", "1F44D": "#fadcbc", "1F44D-1F3FD": "#c19a65", "1F3FD": "#c19a65",
         "E000": "#1e50a0"}


def make_package(root: Path, records=RECORDS) -> Path:
    (root / "data").mkdir(parents=True)
    (root / "color" / "svg").mkdir(parents=True)
    (root / "data" / "openmoji.json").write_text(json.dumps(records), encoding="utf-8")
    for hexcode, fill in FILLS.items():
        (root / "color" / "svg" / f"{hexcode}.svg").write_text(SVG.format(r=30, fill=fill))
    (root / "color" / "svg" / "1F34F.svg").write_text("<svg><circle")  # truncated: not drawable
    return root


def test_captions_are_the_annotators_words_then_frames(tmp_path):
    entry = read_catalogue(make_package(tmp_path / "package"))[0]
    assert entry.image_id == "openmoji-1f600"
    captions = captions_for(entry, 5)
    assert captions[:3] == ["grinning face", "face, grin, grinning, happy", "smile, happy"]
    assert len(set(captions)) == 5 and all("grinning face" in c for c in captions[3:])
    assert caption_form("thumbs up: medium-light skin tone") == "thumbs up medium light skin tone"
    assert caption_form("pi\u00f1ata") == "pinata"
    bare = OpenMojiEntry("E000", "spouting orca", (), ("whale", "orca"), "x", "extras-openmoji", "animal")
    assert captions_for(bare, 2) == ["spouting orca", "whale, orca"]  # no keywords: nothing empty in their place
    with pytest.raises(ValueError):
        captions_for(entry, 0)


def test_catalogue_leaves_out_components_and_keeps_groups_as_ground_truth(tmp_path):
    entries = {e.hexcode: e for e in read_catalogue(make_package(tmp_path / "package"))}
    assert "1F3FD" not in entries  # a skin-tone swatch is a part, not a picture
    assert entries["1F44D-1F3FD"].base == entries["1F44D"].base == base_key("\U0001F44D")
    assert entries["1F600"].objects == [{"class": "group:smileys-emotion"}, {"class": "subgroup:face-smiling"}]
    assert entries["E000"].keywords == () and entries["E000"].tags == ("whale", "orca", "water")
    # no group in the table: classes of its own, so unknown emoji are not all "alike" to the metric
    unknown = OpenMojiEntry("E001", "x", (), (), "x", "", "")
    assert unknown.objects == [{"class": "group:unknown:openmoji-e001"}, {"class": "subgroup:unknown:openmoji-e001"}]


def test_svg_is_drawn_onto_white_at_the_asked_size():
    png = render_svg(SVG.format(r=18, fill="#ff0000").encode(), 48, "x.svg")
    picture = np.asarray(Image.open(io.BytesIO(png)))
    assert picture.shape == (48, 48, 3)
    assert picture[0, 0].tolist() == [255, 255, 255]  # transparent corners become white, not black
    assert picture[24, 24].tolist() == [255, 0, 0]


def _records_by_split(out: Path) -> dict[str, list[dict]]:
    manifest = json.loads((out / "manifest.json").read_text())
    found: dict[str, list[dict]] = {}
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            with tarfile.open(out / shard) as tar:
                found.setdefault(split, []).extend(
                    json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json"))
    return found


def test_build_writes_variant_safe_splits_and_counts_bad_svgs(tmp_path):
    out = tmp_path / "set"
    code = main(["build", "--source", "openmoji", "--openmoji-dir", str(make_package(tmp_path / "package")),
                 "--out", str(out), "--name", "openmoji", "--openmoji-image-size", "32", "--min-concept-count", "1",
                 "--spacy-pipeline", "blank", "--openmoji-val-fraction", "0.3", "--openmoji-test-fraction", "0.3"])
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"]["missing_image"]["count"] == 1 and manifest["skipped"]["corrupt_image"]["count"] == 1
    records = {r["image_id"]: (split, r) for split, rs in _records_by_split(out).items() for r in rs}
    assert set(records) == {"openmoji-1f600", "openmoji-1f622", "openmoji-1f44d", "openmoji-1f44d-1f3fd",
                            "openmoji-e000"}
    # a skin-tone variant falls where its base emoji does, as in the emoji corpus (same hash of the same base)
    assert records["openmoji-1f44d"][0] == records["openmoji-1f44d-1f3fd"][0] == \
        split_of(base_key("\U0001F44D"), 0.3, 0.3)
    split, grin = records["openmoji-1f600"]
    assert grin["objects"] == [{"class": "group:smileys-emotion"}, {"class": "subgroup:face-smiling"}]
    assert grin["captions"][:3] == ["grinning face", "face, grin, grinning, happy", "smile, happy"]
    assert manifest["build"]["openmoji_image_size"] == 32


def test_unusable_package_is_one_clear_error(tmp_path, capsys):
    assert main(["build", "--source", "openmoji", "--out", str(tmp_path / "a")]) == 2
    assert "--openmoji-dir" in capsys.readouterr().err
    package = tmp_path / "package"
    (package / "data").mkdir(parents=True)
    (package / "data" / "openmoji.json").write_text('{"not": "a list"}')
    assert main(["build", "--source", "openmoji", "--openmoji-dir", str(package), "--out", str(tmp_path / "b")]) == 2
    assert "openmoji.json" in capsys.readouterr().err
    (package / "data" / "openmoji.json").write_text('[{"annotation": "no hexcode"}]')
    assert main(["build", "--source", "openmoji", "--openmoji-dir", str(package), "--out", str(tmp_path / "c")]) == 2
    assert "record 0 has no hexcode" in capsys.readouterr().err


def test_options_out_of_range_are_refused_before_any_work(tmp_path, capsys):
    package = str(make_package(tmp_path / "package"))
    for bad in (["--openmoji-image-size", "8"], ["--openmoji-captions", "0"], ["--openmoji-limit", "-1"],
                ["--openmoji-val-fraction", "1.0"]):
        with pytest.raises(SystemExit) as stop:
            main(["build", "--source", "openmoji", "--openmoji-dir", package, "--out", str(tmp_path / "x"), *bad])
        assert stop.value.code == 2 and bad[0] in capsys.readouterr().err
    assert main(["build", "--source", "openmoji", "--openmoji-dir", package, "--out", str(tmp_path / "x"),
                 "--openmoji-val-fraction", "0.5", "--openmoji-test-fraction", "0.5"]) == 2
    assert "leave nothing to train on" in capsys.readouterr().err and not (tmp_path / "x" / "manifest.json").exists()
