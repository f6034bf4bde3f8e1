"""`--source union`: several sources as one set with one vocabulary, ids and shards kept apart per part, each
part's options recorded; a set built afterwards with --vocab-from it shares that vocabulary byte for byte."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from shards.__main__ import main

SMALL = ("--train-images", "40", "--val-images", "8", "--test-images", "8", "--emoji-limit", "60",
         "--spacy-pipeline", "blank", "--min-concept-count", "2", "--shard-size", "32")


def build_union(out: Path, *extra: str) -> int:
    return main(["build", "--source", "union", "--union-parts", "builtin,emoji", "--out", str(out),
                 "--name", "union", *SMALL, *extra])


@pytest.fixture(scope="module")
def union_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("union") / "set"
    assert build_union(out) == 0
    return out


def member_keys(shard: Path) -> set[str]:
    with tarfile.open(shard) as tar:
        return {name.split(".")[0] for name in tar.getnames()}


def test_both_parts_are_in_every_split_with_their_names_in_front(union_set):
    manifest = json.loads((union_set / "manifest.json").read_text())
    for split, info in manifest["splits"].items():
        per_shard = [member_keys(union_set / shard) for shard in info["shards"]]
        prefixes = [{key.split("_")[0] for key in keys} for keys in per_shard]
        assert {p for ps in prefixes for p in ps} == {"builtin", "emoji"}, split
        assert all(len(ps) == 1 for ps in prefixes), f"{split}: a shard mixes parts: {prefixes}"
    assert manifest["splits"]["train"]["images"] > 40  # the built-in's 40 and the emoji's train share of 60


def test_one_vocabulary_holds_the_words_of_both_parts(union_set):
    words = set(json.loads((union_set / "vocab.json").read_text())["words"])
    assert {"red", "circle"} <= words or {"blue", "square"} <= words  # the built-in's colours and shapes
    assert "face" in words  # the emoji names'


def test_the_manifest_records_the_parts_and_each_parts_options(union_set):
    build = json.loads((union_set / "manifest.json").read_text())["build"]
    assert build["union_parts"] == ["builtin", "emoji"]
    assert build["train_images"] == 40 and build["emoji_limit"] == 60  # builtin's and emoji's own options
    assert "openmoji_dir" not in build and "karpathy_json" not in build  # options of sources not in the union


def test_a_held_out_set_built_with_vocab_from_the_union_shares_its_vocabulary(union_set, tmp_path):
    held = tmp_path / "held"
    assert main(["build", "--source", "builtin", "--out", str(held), "--vocab-from", str(union_set), "--seed", "7",
                 "--train-images", "16", "--val-images", "8", "--test-images", "8", "--spacy-pipeline", "blank",
                 "--min-concept-count", "2"]) == 0
    for name in ("concepts.json", "vocab.json"):
        assert (held / name).read_bytes() == (union_set / name).read_bytes()


@pytest.mark.parametrize(("parts", "said"), [
    (None, "--source union needs --union-parts"),
    ("builtin,nosuch", "--union-parts: nosuch cannot be a part"),
    ("builtin,union", "--union-parts: union cannot be a part"),
    ("builtin,builtin", "each once"),
])
def test_bad_parts_are_refused_in_one_line_before_anything_is_written(parts, said, tmp_path, capsys):
    argv = ["build", "--source", "union", "--out", str(tmp_path / "u"), *SMALL]
    if parts is not None:
        argv += ["--union-parts", parts]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusal of a malformed value
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "u").exists() or not any((tmp_path / "u").iterdir())


def test_a_picture_of_each_part_decodes(union_set):
    manifest = json.loads((union_set / "manifest.json").read_text())
    seen = set()
    for shard in manifest["splits"]["val"]["shards"]:
        with tarfile.open(union_set / shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".png"):
                    Image.open(io.BytesIO(tar.extractfile(member).read())).verify()
                    seen.add(member.name.split("_")[0])
    assert seen == {"builtin", "emoji"}
