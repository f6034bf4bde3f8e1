"""The README's "Pretraining, then your own corpus" block, as written, through to its end.

From a scratch folder laid out like a checkout (configs/ is the repository's): the union build, pretraining, its
export, the held-out OpenMoji build with the union's vocabulary, the zero-shot evaluation, fine-tuning from the
export and training from scratch. Only small options are appended (few pictures, the blank spaCy pipeline, few
steps, a small model); the `npm pack` line, a download, is replaced by a package made here (real emoji names,
circles for pictures: tests/helpers/openmoji_package.py). Then what the block promises is checked: one vocabulary
in both sets, the fine-tuned run started from the export, the scratch run did not, and the zero-shot results went
to their own file without touching the pretraining run's results or its concatenation record."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from openmoji_package import emoji_like_package
from test_distributed import clean_env
from test_readme_commands import SMALL, readme_block

REPO = Path(__file__).resolve().parents[2]
HEADING = "## Pretraining, then your own corpus"
DOWNLOAD = "npm pack "
SMALL_UNION = ("--train-images", "48", "--val-images", "16", "--test-images", "16", "--emoji-limit", "120",
               "--spacy-pipeline", "blank", "--shard-size", "32")
SMALL_HELD_OUT = ("--spacy-pipeline", "blank", "--shard-size", "32", "--openmoji-val-fraction", "0.25",
                  "--openmoji-test-fraction", "0.25")
TIMEOUT = 300


def appended(line: str) -> tuple[str, ...]:
    if "--source union" in line:
        return SMALL_UNION
    if "--source openmoji" in line:
        return SMALL_HELD_OUT
    if "trainer.train" in line:
        return (*SMALL, "engine.threads=1")
    return ()


def run(line: str, cwd: Path) -> str:
    done = subprocess.run(["bash", "-c", " ".join([line, *appended(line)])], cwd=cwd, env=clean_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, f"{line}: exit {done.returncode}\n{done.stdout[-4000:]}"
    return done.stdout


@pytest.fixture(scope="module")
def block_run(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    checkout = tmp_path_factory.mktemp("checkout")
    (checkout / "configs").symlink_to(REPO / "configs")
    outputs: dict[str, str] = {}
    for line in readme_block(HEADING):
        if line.startswith(DOWNLOAD):  # unpacks ./package
            emoji_like_package(checkout / "package")
            continue
        if line.startswith("python -m trainer.evaluate"):  # the record the zero-shot evaluation must not touch
            outputs["record_before"] = (checkout / "runs/pretrain_union/eval/concat_weight.json").read_text()
        outputs[line] = run(line, checkout)
    return checkout, outputs


def test_the_block_is_the_pretraining_path():
    lines = readme_block(HEADING)
    assert [line.split()[:4] for line in lines if not line.startswith(DOWNLOAD)] == [
        ["python", "-m", "shards", "build"], ["python", "-m", "trainer.train", "--config"],
        ["python", "-m", "trainer.export", "--run"], ["python", "-m", "shards", "build"],
        ["python", "-m", "trainer.evaluate", "--run"], ["python", "-m", "trainer.train", "--config"],
        ["python", "-m", "trainer.train", "--config"]]


@pytest.mark.slow
def test_the_held_out_set_shares_the_union_vocabulary(block_run):
    checkout, _ = block_run
    for name in ("concepts.json", "vocab.json"):
        assert (checkout / "data/openmoji-u" / name).read_bytes() == (checkout / "data/union" / name).read_bytes()
    assert json.loads((checkout / "data/union/manifest.json").read_text())["build"]["union_parts"] == \
        ["builtin", "emoji"]


@pytest.mark.slow
def test_fine_tuning_starts_from_the_export_and_scratch_does_not(block_run):
    checkout, outputs = block_run
    lines = readme_block(HEADING)
    finetune, scratch = lines[-2], lines[-1]
    assert "initial weights from runs/pretrain_union/model.pt" in outputs[finetune]
    assert "initial weights" not in outputs[scratch]
    for run_dir in ("runs/openmoji_finetune", "runs/openmoji_scratch"):
        test = json.loads((checkout / run_dir / "eval" / "test.json").read_text())
        assert test["step"] == 4 and test["counts"]["images"] > 0


@pytest.mark.slow
def test_zero_shot_results_have_their_own_file_and_leave_the_runs_own_alone(block_run):
    checkout, outputs = block_run
    evaluated = checkout / "runs/pretrain_union/eval"
    zero_shot = json.loads((evaluated / "openmoji.test.json").read_text())
    own = json.loads((evaluated / "test.json").read_text())
    held_out_test = json.loads((checkout / "data/openmoji-u/manifest.json").read_text())["splits"]["test"]
    assert zero_shot["counts"]["images"] == held_out_test["images"] != own["counts"]["images"]
    assert zero_shot["concat_weight"]["chosen"] is False
    assert (evaluated / "concat_weight.json").read_text() == outputs["record_before"]
    # on the held-out val split (where the run's own val chooses the share) the run's share is used, not chosen
    run("python -m trainer.evaluate --run runs/pretrain_union --split val data.shards=data/openmoji-u", checkout)
    assert json.loads((evaluated / "openmoji.val.json").read_text())["concat_weight"]["chosen"] is False
    assert (evaluated / "concat_weight.json").read_text() == outputs["record_before"]
    line = next(line for line in readme_block(HEADING) if line.startswith("python -m trainer.evaluate"))
    assert "of shard set 'openmoji'" in outputs[line] and "openmoji.test.json" in outputs[line]


@pytest.mark.slow
def test_a_set_with_other_vocabularies_is_refused_before_the_model_is_built(block_run):
    checkout, _ = block_run
    subprocess.run(["bash", "-c", "python -m shards build --source builtin --out data/other --train-images 16 "
                    "--val-images 8 --test-images 8 --spacy-pipeline blank"], cwd=checkout, env=clean_env(),
                   check=True, capture_output=True, timeout=TIMEOUT)
    done = subprocess.run(["bash", "-c", "python -m trainer.evaluate --run runs/pretrain_union data.shards=data/other"],
                          cwd=checkout, env=clean_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert "vocabulary differs from data/union/" in line and "--vocab-from data/union" in line, line
    assert not (checkout / "runs/pretrain_union/eval/builtin.test.json").exists()  # the other set's name
