"""Issue 26: a file of a shard set (a shard tar, manifest.json, concepts.json, vocab.json) that is a symlink out of
the set's folder is refused by every reader of the set, where the set is opened (trainer.data.shardset.ShardSet):
evaluation, `retrieve export --shards`, feature extraction, with exit 2 and one line naming the link and its
target. (`shards check|stats` and training meet the same case in the generated member family,
test_bad_inputs_generated.py; the damaged sets are made by its bad_input_members.damaged_set.)"""
from __future__ import annotations

import pytest
import yaml
from bad_input_generated import _call, judge_refusal
from bad_input_members import SET_FILES, damaged_set
from conftest import REPO

from trainer.data.shardset import ShardSet
from trainer.eval.evaluation import main as evaluate_main
from trainer.retrieval.commands import main as retrieve_main
from trainer.tools.extract_features import main as extract_main


def _run_folder(root, d):
    """A run folder holding only config.yaml, its data.shards the damaged set: evaluation reads the set first."""
    tree = yaml.safe_load((REPO / "configs" / "builtin.yaml").read_text())
    tree["data"] = {**tree.get("data", {}), "shards": str(root)}
    tree["engine"] = {**tree.get("engine", {}), "deepspeed_config": str(REPO / "configs" / "deepspeed" / "zero0.json")}
    tree["run"] = {**tree.get("run", {}), "out_dir": str(d / "run")}
    (d / "run").mkdir()
    (d / "run" / "config.yaml").write_text(yaml.safe_dump(tree))
    return d / "run"


@pytest.mark.parametrize("member", SET_FILES)
def test_a_set_file_linking_out_of_the_set_is_refused_by_every_reader_in_one_line(tiny_shards, tmp_path, member):
    root, link, _ = damaged_set(tiny_shards, member, "symlink_out", tmp_path)
    target = link.resolve()
    assert link.is_symlink() and not target.is_relative_to(root)
    with pytest.raises(ValueError, match="outside the shard set"):
        ShardSet.open(root)
    run = _run_folder(root, tmp_path)
    readers = {"evaluate": (evaluate_main, ["--run", str(run)]),
               "retrieve export --shards": (retrieve_main, ["export", "--run", str(run), "--out",
                                                            str(tmp_path / "index"), "--shards", str(root)]),
               "extract_features": (extract_main, ["--shards", str(root), "--out", str(tmp_path / "features")])}
    for reader, (main, argv) in readers.items():
        code, _out, err, _stopped, tb = _call(main, argv)
        assert not tb, f"{reader}: {tb}"
        outcome, detail = judge_refusal(code, err, (str(link), str(target)))
        assert outcome == "refused" and "outside the shard set" in detail, f"{reader}: {outcome}: {detail}"
    assert not (tmp_path / "index").exists() and not (tmp_path / "features").exists()
