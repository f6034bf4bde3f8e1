"""`hier-shards check` and `hier-shards stats` on a built set, and on copies of it broken in one place each."""
from __future__ import annotations

import io
import json
import shutil
import statistics
import tarfile
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from shards.__main__ import main
from shards.builtin_corpus import builtin_samples
from shards.text import tokenize

SIZES = {"train": 30, "val": 8, "test": 10}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("check") / "set"
    assert main(["build", "--source", "builtin", "--out", str(out), "--seed", "3", "--train-images", "30",
                 "--val-images", "8", "--test-images", "10", "--shard-size", "8", "--min-concept-count", "2",
                 "--spacy-pipeline", "blank"]) == 0
    return out


@pytest.fixture
def broken(good, tmp_path) -> Path:
    copy = tmp_path / "broken"
    shutil.copytree(good, copy)
    return copy


Members = list[tuple[str, bytes]]


def rewrite_shard(path: Path, change: Callable[[Members], Members]) -> None:
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(path, "w") as tar:
        for name, data in change(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def edit_json(members: Members, index: int, edit: Callable[[dict], None]) -> Members:
    """Apply edit to the json of the index-th sample."""
    out = list(members)
    name, data = out[2 * index + 1]
    record = json.loads(data)
    edit(record)
    out[2 * index + 1] = (name, json.dumps(record).encode())
    return out


def run_check(root: Path, capsys) -> tuple[int, str]:
    code = main(["check", str(root)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_a_good_set_passes_with_its_counts(good, capsys):
    code, out = run_check(good, capsys)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[:3] == ["train: 30 images, 150 captions, 4 shards", "val: 8 images, 40 captions, 1 shards",
                         "test: 10 images, 50 captions, 2 shards"]
    assert lines[-1] == f"{good}: ok"


def test_a_corrupted_picture_is_named_by_shard_and_sample(broken, capsys):
    shard = broken / "builtin-train-000001.tar"
    rewrite_shard(shard, lambda ms: [(n, d[: len(d) // 2] if n == ms[4][0] else d) for n, d in ms])
    code, out = run_check(broken, capsys)
    assert code == 1
    assert f"{shard}: sample 'builtin-train-0000010': undecodable .png" in out
    assert out.splitlines()[-1] == f"{broken}: 1 problems"


def test_a_picture_that_is_not_one_is_worded_without_a_memory_address(broken, capsys):
    """PIL names unidentifiable bytes by their repr (<_io.BytesIO object at 0x...>): two checks of one set must
    print the same line."""
    shard = broken / "builtin-train-000001.tar"
    rewrite_shard(shard, lambda ms: [(n, b"not a picture at all" if n == ms[4][0] else d) for n, d in ms])
    code, out = run_check(broken, capsys)
    line = next(x for x in out.splitlines() if "undecodable .png" in x)
    assert code == 1 and "cannot identify image file its bytes" in line and "object at 0x" not in out, line


def test_a_concept_id_outside_concepts_json_is_refused(broken, capsys):
    num_concepts = json.loads((broken / "manifest.json").read_text())["num_concepts"]
    shard = broken / "builtin-test-000001.tar"

    def bad_ids(record: dict) -> None:
        record["caption_concepts"][1] = [num_concepts]
        record["image_concepts"] = sorted(set(record["image_concepts"]) | {num_concepts})

    rewrite_shard(shard, lambda ms: edit_json(ms, 0, bad_ids))
    code, out = run_check(broken, capsys)
    assert code == 1
    assert f"{shard}: sample 'builtin-test-0000008': caption_concepts[1] = [{num_concepts}]" in out
    assert f"{shard}: sample 'builtin-test-0000008': image_concepts = " in out
    assert f"not sorted unique ids in [0, {num_concepts})" in out


def test_json_fields_are_checked(broken, capsys):
    shard = broken / "builtin-val-000000.tar"

    def several(ms: Members) -> Members:
        ms = edit_json(ms, 0, lambda r: r.update(split="train"))
        ms = edit_json(ms, 1, lambda r: r.update(image_concepts=[]))  # not the union of its captions' concepts
        ms = edit_json(ms, 2, lambda r: r.pop("captions"))
        ms = edit_json(ms, 3, lambda r: r["caption_concepts"].pop())
        return [m for m in ms if m[0] != "builtin-val-0000004.json"]  # a picture without json

    rewrite_shard(shard, several)
    code, out = run_check(broken, capsys)
    assert code == 1
    prefix = f"{shard}: sample 'builtin-val-000000"
    assert f"{prefix}0': split 'train' but the manifest lists its shard under 'val'" in out
    assert f"{prefix}1': image_concepts [] is not the union" in out
    assert f"{prefix}2': json lacks ['captions']" in out
    assert f"{prefix}3': caption_concepts must have one list per caption" in out
    assert f"{prefix}4': no json member" in out
    # the sample without json and the one without captions also make the caption count fall short
    assert "split 'val' lists 40 captions, its shards hold 30" in out


def test_count_mismatches_missing_and_stray_shards_are_refused(broken, capsys):
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["splits"]["train"]["images"] = 31
    (broken / "manifest.json").write_text(json.dumps(manifest))
    code, out = run_check(broken, capsys)
    assert code == 1
    assert f"{broken / 'manifest.json'}: split 'train' lists 31 images, its shards hold 30" in out

    (broken / "builtin-val-000000.tar").rename(broken / "builtin-val-000009.tar")
    code, out = run_check(broken, capsys)
    assert f"{broken / 'builtin-val-000000.tar'}: listed in manifest.json for split 'val' but missing" in out
    assert "shards not listed in manifest.json: builtin-val-000009.tar" in out
    assert "split 'val' lists 8 images, its shards hold 0" in out

    (broken / "builtin-test-000000.tar").write_bytes(b"not a tar at all" * 100)
    code, out = run_check(broken, capsys)
    assert f"{broken / 'builtin-test-000000.tar'}: unreadable tar" in out


def test_set_files_that_disagree_are_refused(broken, capsys):
    concepts = json.loads((broken / "concepts.json").read_text())
    concepts["concepts"].pop()
    (broken / "concepts.json").write_text(json.dumps(concepts))
    code, out = run_check(broken, capsys)
    assert code == 2 and "num_concepts" in out and "concepts.json" in out
    (broken / "manifest.json").unlink()
    code, out = run_check(broken, capsys)
    assert code == 2 and str(broken / "manifest.json") in out


def test_region_features_are_loaded_without_pickle(broken, capsys):
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["image_ext"] = "npy"
    (broken / "manifest.json").write_text(json.dumps(manifest))

    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=True)
        return buffer.getvalue()

    features = npy(np.zeros((36, 8), dtype=np.float16))
    for shard in broken.glob("*.tar"):
        rewrite_shard(shard, lambda ms: [(n.replace(".png", ".npy"), features if n.endswith(".png") else d)
                                         for n, d in ms])
    assert run_check(broken, capsys)[0] == 0
    shard = broken / "builtin-train-000000.tar"
    pickled = npy(np.array([{"a": 1}], dtype=object))
    rewrite_shard(shard, lambda ms: [(n, pickled if n == "builtin-train-0000002.npy" else d) for n, d in ms])
    code, out = run_check(broken, capsys)
    assert code == 1 and f"{shard}: sample 'builtin-train-0000002': undecodable .npy" in out
    assert "allow_pickle" in out


def test_stats_agree_with_the_samples_and_the_concept_counts(good, capsys):
    assert main(["stats", str(good), "--json", "--top", "5"]) == 0
    stats = json.loads(capsys.readouterr().out)
    manifest = json.loads((good / "manifest.json").read_text())
    concepts = json.loads((good / "concepts.json").read_text())["concepts"]
    assert stats["num_concepts"] == len(concepts) and stats["labels"]["tagger"] is False
    assert stats["bytes"] == sum(p.stat().st_size for p in good.glob("*.tar"))
    for split, n in SIZES.items():
        s = stats["splits"][split]
        samples = list(builtin_samples(split, n, seed=3, image_size=64))
        assert (s["images"], s["captions"], s["captions_per_image"]) == (n, 5 * n, {"5": n})
        assert s["shard_bytes"] == {name: (good / name).stat().st_size for name in manifest["splits"][split]["shards"]}
        words = [len(tokenize(c)) for sample in samples for c in sample.captions]
        assert s["words_per_caption"]["mean"] == pytest.approx(statistics.fmean(words), abs=1e-3)
        assert (s["words_per_caption"]["min"], s["words_per_caption"]["max"]) == (min(words), max(words))
        assert len(s["top_concepts"]) == 5
    # concepts.json counts the training captions that hold each concept: the same as stats' train counts
    top = stats["splits"]["train"]["top_concepts"]
    assert [(c["lemma"], c["captions"]) for c in top] == [(c["lemma"], c["count"]) for c in concepts[:5]]

    assert main(["stats", str(good)]) == 0
    text = capsys.readouterr().out
    assert "train: 30 images, 150 captions" in text and "captions per image: 5: 30" in text
    assert f"most frequent: {concepts[0]['lemma']} {concepts[0]['count']}" in text
    assert "lookup lemmatizer, no tagger" in text
