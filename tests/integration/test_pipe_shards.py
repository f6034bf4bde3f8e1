"""Issue 24: webdataset's `pipe:COMMAND` shard sets (brace lists, no manifest), mixed into training beside
data.shards. `pipe:cat ...` of the tiny set's local shards: the stream reads what it reads from the folder; a saved
position continues exactly, the command run again from the shard's start and the bytes before the saved sample
read and dropped (logged, and counted in the restore cost); a failing command is retried, then its shard skipped
and named; bad pipe: settings are refused before training in one line."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from shards.remote import RemoteReads, ShardUnreachableError, expand_pipe
from trainer.config import ConfigError, load_config
from trainer.data.loader import TrainLoader
from trainer.data.shardset import ShardSet, mix_sets
from trainer.data.shardstream import Identity, RawStream
from trainer.training.factory import build_train_stream
from trainer.training.loop import train

REPO = Path(__file__).resolve().parents[2]
TINY = ("data.batch_size=8", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32",
        "model.word_dim=16", "data.shuffle_buffer=32", "data.image_size=32", "engine.threads=1",
        f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero0.json'}")
FAST = RemoteReads(timeout=5.0, retries=2, backoff=0.01)


def pipe_spec(shards: Path, split: str = "train") -> str:
    names = json.loads((shards / "manifest.json").read_text())["splits"][split]["shards"]
    first, last = names[0].rsplit("-", 1)[1][:-4], names[-1].rsplit("-", 1)[1][:-4]
    return f"pipe:cat {shards}/builtin-{split}-{{{first}..{last}}}.tar"


def _stream(urls: list[str], errors: list | None = None, reads: RemoteReads = FAST, **kw) -> RawStream:
    errors = [] if errors is None else errors
    return RawStream([urls], [1.0], resampled=False, shuffle_buffer=kw.pop("buffer", 1), who=Identity(0, 1, 0, 1, 0),
                     handler=lambda exn, url: errors.append((exn, url)) or True, reads=reads, **kw)


def test_a_pipe_set_expands_its_brace_list_and_streams_what_the_folder_holds(tiny_shards):
    spec = pipe_spec(tiny_shards)
    urls = ShardSet.pipe(spec, ShardSet.open(tiny_shards), "train").urls("train")
    assert urls == [f"pipe:cat {tiny_shards}/builtin-train-{i:06d}.tar" for i in range(6)] == expand_pipe(spec)
    local = [s["__key__"] for s in _stream(ShardSet.open(tiny_shards).urls("train"), passes=1).samples()]
    piped = _stream(urls, passes=1)
    got = [s["__key__"] for s in piped.samples()]
    assert got == local and len(set(got)) == 96


def test_a_saved_position_in_a_pipe_shard_continues_exactly_re_reading_it_from_its_start(tiny_shards, caplog):
    urls = expand_pipe(pipe_spec(tiny_shards))
    whole = _stream(urls, buffer=8, passes=1)
    samples = whole.samples()
    first = [next(samples)["__key__"] for _ in range(21)]  # 8 buffered + 21 out: the cursor is inside shard 2
    state = whole.state()
    rest = [s["__key__"] for s in samples]
    assert state.cursors[0][3] > 0 and len(first) + len(rest) == 96

    resumed = _stream(urls, buffer=8, passes=1)
    with caplog.at_level(logging.INFO, logger="trainer.data.shardstream"):
        cost = resumed.restore(state)
        again = [s["__key__"] for s in resumed.samples()]
    assert again == rest
    offset = state.cursors[0][3]
    assert f"cannot seek: re-reading it from its start, {offset} bytes to skip to the saved sample" in caplog.text
    assert "buffered samples were re-read from its start" in caplog.text
    # the buffer's shards read from their start up to their last buffered sample, the current one up to its cursor
    assert cost.bytes >= offset + sum(ref[3] for ref in state.buffer)


def test_a_failing_command_is_retried_then_its_shard_skipped_and_named(tiny_shards, tmp_path):
    urls = expand_pipe(pipe_spec(tiny_shards))
    flaky = tmp_path / "tries"
    # fails on its first run, works on the second: a flaky download, retried from the start of the shard
    urls[0] = f"pipe:if [ -e {flaky} ]; then cat {urls[0][len('pipe:cat '):]}; else touch {flaky}; exit 3; fi"
    urls[1] = "pipe:cat /no/such/shard.tar"
    errors: list = []
    got = [s["__key__"] for s in _stream(urls, errors, passes=1).samples()]
    assert len(got) == 80 and len(errors) == 1
    exn, url = errors[0]
    assert isinstance(exn, ShardUnreachableError) and url == urls[1]
    assert "exited with status 1" in str(exn) and "No such file" in str(exn) and "after 2 retries" in str(exn)


def _cfg(tiny_shards: Path, out: Path, *extra: str):
    return load_config(REPO / "configs" / "builtin.yaml", [f"data.shards={tiny_shards}", f"run.out_dir={out}",
                                                          "data.resampled=true", *TINY, *extra])


def test_the_loader_resumes_a_mix_with_a_pipe_set_exactly(tiny_shards, tmp_path):
    cfg = _cfg(tiny_shards, tmp_path, f"data.mix_shards=['{pipe_spec(tiny_shards)}']", "data.mix_weights=[1,3]")

    def loader() -> TrainLoader:
        shardset = ShardSet.open(cfg.data.shards)
        mix = mix_sets(shardset, cfg.data.mix_shards, cfg.data.mix_weights, "train")
        return TrainLoader(build_train_stream(cfg, shardset, rank=0, world_size=1, mix=mix), num_workers=0)

    whole = loader()
    for _ in range(3):
        next(whole)
    saved = whole.state_dict()
    rest = [next(whole)[1]["image_ids"].tolist() for _ in range(3)]
    whole.close()
    resumed = loader()
    resumed.load_state_dict(saved)
    assert [next(resumed)[1]["image_ids"].tolist() for _ in range(3)] == rest
    resumed.close()
    assert resumed.resume_cost["bytes"] > 0


def test_training_mixes_in_a_pipe_set(tiny_shards, tmp_path):
    final = train(_cfg(tiny_shards, tmp_path / "run", f"data.mix_shards=['{pipe_spec(tiny_shards)}']",
                       "data.mix_weights=[1,1]", "train.steps=3", "train.log_every=1", "train.eval_every=0",
                       "train.ckpt_every=0", "data.num_workers=1"))
    assert "test" in final
    logged = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3]
    piped = logged[-1]["data/samples/builtin-train-{000000..000005}.tar"]
    assert piped > 0 and piped + logged[-1]["data/samples/builtin"] == 3 * 8  # both sets fed the batches


@pytest.mark.parametrize("extra, named", [
    (("data.shards=pipe:cat /x/s-{0..3}.tar",), ("data.shards", "has no manifest", "data.mix_shards")),
    (("data.mix_shards=['pipe:cat /x/s-{0..3}.tar']",), ("data.mix_weights", "data.mix_weights=[1, 1]")),
    (("data.mix_shards=['pipe:nosuchtool /x/s-{0..3}.tar']", "data.mix_weights=[1,1]"),
     ("data.mix_shards[0]", "'nosuchtool', which is not on PATH")),
    (("data.mix_shards=['pipe:  ']", "data.mix_weights=[1,1]"), ("data.mix_shards[0]", "names no command")),
])
def test_bad_pipe_settings_are_refused_naming_the_key(tiny_shards, tmp_path, extra, named):
    with pytest.raises(ConfigError) as refused:
        train(_cfg(tiny_shards, tmp_path / "run", *extra))
    for text in named:
        assert text in str(refused.value), str(refused.value)
    assert not (tmp_path / "run").exists()
