"""Issue 26: `shards check` holds every shard to the format the trainer reads: a plain tar. A gzip-compressed tar
named .tar (tarfile would read it transparently, the trainer cannot) and a zero-byte tar are problems named by
their file; `shards stats` refuses them with one line; a json whose captions are not a list is a problem, not a
traceback."""
from __future__ import annotations

import bz2
import gzip
import json
import shutil
from pathlib import Path

import pytest

from shards.__main__ import main as shards_main
from shards.check import check_shard_set


def _copy_with(tiny_shards: Path, tmp_path: Path, damage) -> tuple[Path, Path]:
    root = Path(shutil.copytree(tiny_shards, tmp_path / "set"))
    shard = root / json.loads((root / "manifest.json").read_text())["splits"]["train"]["shards"][1]
    damage(shard)
    return root, shard


DAMAGES = {
    "gzip": (lambda p: p.write_bytes(gzip.compress(p.read_bytes())), "it is gzip-compressed; shards must be plain"),
    "bzip2": (lambda p: p.write_bytes(bz2.compress(p.read_bytes())), "it is bzip2-compressed"),
    "zero_bytes": (lambda p: p.write_bytes(b""), "it is empty (0 bytes), not a tar"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_check_reports_a_tar_the_trainer_cannot_read_and_stats_refuses_it(tiny_shards, tmp_path, capsys, damage):
    write, why = DAMAGES[damage]
    root, shard = _copy_with(tiny_shards, tmp_path, write)
    problems = check_shard_set(root).problems
    assert any(p.startswith(f"{shard}: unreadable tar after") and why in p for p in problems), problems
    assert shards_main(["check", str(root)]) == 1
    assert shards_main(["stats", str(root)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{shard}: unreadable tar: {why}" in err[0], err


def test_captions_that_are_not_a_list_are_a_problem_of_check_and_a_line_of_stats(tiny_shards, tmp_path, capsys):
    from corrupt_shards import read_members, write_tar

    def captions_42(path: Path) -> None:
        write_tar(path, [(n, json.dumps(dict(json.loads(d), captions=42)).encode() if n.endswith(".json") else d)
                         for n, d in read_members(path)])

    root, shard = _copy_with(tiny_shards, tmp_path, captions_42)
    problems = check_shard_set(root).problems
    assert any(str(shard) in p and "captions must be a non-empty list" in p for p in problems)
    assert shards_main(["stats", str(root)]) == 2
    assert "must be lists" in capsys.readouterr().err
