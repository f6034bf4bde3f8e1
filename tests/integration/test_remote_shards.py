"""Issue 24: shard sets at a URL. A real HTTP server with Range support and moto's S3-compatible server, both on
127.0.0.1 (tests/helpers/remote_servers.py), serve the tiny shard set: the loader reads the same batches from
them as from the local folder, a saved loader position continues exactly over the network, a training run over
HTTP and over S3 logs the same losses as the local one, and a URL that cannot be read is refused in one line.
Then a flaky network (the HTTP server's injected faults): a dropped connection, a 503 and a stall are retried from
the byte where the read stopped, losing and repeating nothing; a shard that keeps failing is skipped and named."""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from remote_servers import RangeHTTPServer, S3Server
from retrieval_run import exported_index, trained_run
from test_distributed import clean_env, start, wait_all
from test_faults import RUN_STEPS, logged_steps, train_cmd, wait_for_logged
from test_readme_commands import STORE_HEADING, readme_block

import shards.remote as remote_module
from shards.__main__ import main as shards_main
from shards.remote import RemoteReads, RetryingShard, ShardUnreachableError
from trainer.config import load_config
from trainer.config.cli_args import parse_args, resolved_config
from trainer.data.loader import TrainLoader
from trainer.data.shardset import ShardSet, mix_sets
from trainer.data.shardstream import Identity, RawStream
from trainer.engine import checkpoint
from trainer.retrieval.commands import ExportOptions, export_index
from trainer.retrieval.index_folder import RetrievalIndex
from trainer.tools.export import export
from trainer.tools.extract_features import extract
from trainer.training.factory import build_train_stream
from trainer.training.loop import train

REPO = Path(__file__).resolve().parents[2]
TINY = ("data.batch_size=8", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32",
        "model.word_dim=16", "data.shuffle_buffer=32", "data.image_size=32",
        f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / 'zero0.json'}")
BATCHES = 6


@pytest.fixture(scope="module")
def sources(tiny_shards):
    """{"local": folder, "http": URL, "s3": URL} of one shard set; both servers stop when the module is done."""
    with RangeHTTPServer(tiny_shards) as http, S3Server() as s3, pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            env.delenv(key)
        for key, value in s3.env().items():
            env.setenv(key, value)
        yield {"local": str(tiny_shards), "http": http.url(), "s3": s3.upload(tiny_shards, "corpus", "tiny/v1"),
               "http_server": http, "s3_server": s3}


def _loader(shards: str, tmp: Path, num_workers: int = 1) -> TrainLoader:
    cfg = load_config(REPO / "configs" / "builtin.yaml",
                      [f"data.shards={shards}", f"run.out_dir={tmp}", f"data.num_workers={num_workers}", *TINY])
    stream = build_train_stream(cfg, ShardSet.open(cfg.data.shards), rank=0, world_size=1)
    return TrainLoader(stream, num_workers=num_workers)


def _image_ids(loader: TrainLoader, batches: int) -> list[list[int]]:
    try:
        return [next(loader)[1]["image_ids"].tolist() for _ in range(batches)]
    finally:
        loader.close()


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_the_loader_reads_the_same_batches_from_a_url_as_from_the_folder(sources, kind, tmp_path):
    local = _image_ids(_loader(sources["local"], tmp_path), BATCHES)
    remote = _image_ids(_loader(sources[kind], tmp_path), BATCHES)
    assert remote == local


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_a_saved_position_continues_exactly_over_the_network(sources, kind, tmp_path):
    whole = _loader(sources[kind], tmp_path, num_workers=0)
    first = [next(whole)[1]["image_ids"].tolist() for _ in range(3)]
    saved = whole.state_dict()
    rest = _image_ids(whole, 3)

    resumed = _loader(sources[kind], tmp_path, num_workers=0)
    resumed.load_state_dict(saved)
    assert _image_ids(resumed, 3) == rest
    assert resumed.resume_cost["bytes"] > 0  # the shuffle buffer was re-read from its byte ranges, over the network
    assert first != rest


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss/loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_training_over_http_and_s3_logs_the_same_losses_as_over_the_folder(sources, tmp_path):
    losses = {}
    for kind in ("local", "http", "s3"):
        out = tmp_path / kind
        final = train(load_config(REPO / "configs" / "builtin.yaml", [
            f"data.shards={sources[kind]}", f"run.out_dir={out}", "data.num_workers=1", *TINY, "train.steps=4",
            "train.log_every=1", "train.eval_every=1000", "train.ckpt_every=1000", "engine.threads=1"]))
        assert "test" in final  # evaluation at the end read the test split from the same place
        losses[kind] = _losses(out)
    assert len(losses["local"]) == 4
    assert losses["http"] == losses["local"]
    assert losses["s3"] == losses["local"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_cli(shards: str, tmp: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainer.train", "--config", str(REPO / "configs" / "builtin.yaml"),
                           f"data.shards={shards}", f"run.out_dir={tmp / 'out'}", "data.shard_retries=1", *TINY],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def _refused(result: subprocess.CompletedProcess, *named: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


def test_an_unreachable_url_is_refused_in_one_line_before_training(sources, tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/corpus"
    line = _refused(_train_cli(url, tmp_path, dict(os.environ)), "data.shards", f"{url}/manifest.json")
    assert not (tmp_path / "out").exists()
    assert "Connect" in line or "refused" in line


def test_a_missing_bucket_is_refused_naming_the_url_and_the_credential_source(sources, tmp_path):
    line = _refused(_train_cli("s3://no-such-bucket/set", tmp_path, dict(os.environ)),
                    "data.shards", "s3://no-such-bucket/set/manifest.json", "credentials: environment")
    assert "testing" not in line.replace("credentials: environment", "")  # the key id or secret is never shown


def test_a_url_without_a_shard_set_is_refused(sources, tmp_path):
    _refused(_train_cli(sources["http"] + "nothing-here", tmp_path, dict(os.environ)),
             "data.shards", "nothing-here/manifest.json", "is missing")


# ---------------------------------------------------------------------------------------------- a flaky network
# small blocks: a 66 kB shard takes several ranged requests, so faults land in the middle of a shard too
FAST_RETRIES = RemoteReads(block_size=16 * 1024, timeout=1.0, retries=3, backoff=0.05)


def _one_pass(shards: str, reads: RemoteReads, errors: list) -> list[str]:
    """Every sample key of one pass over the train split (one worker), in the order read."""
    stream = RawStream([ShardSet.open(shards).urls("train")], [1.0], resampled=False, shuffle_buffer=1,
                       who=Identity(0, 1, 0, 1, 0), handler=lambda exn, url: errors.append((exn, url)) or True,
                       passes=1, reads=reads)
    return [sample["__key__"] for sample in stream.samples()]


def test_dropped_connections_503s_and_a_stall_lose_and_repeat_nothing(sources):
    http, errors = sources["http_server"], []
    local = _one_pass(sources["local"], FAST_RETRIES, errors)
    # a body cut half way, a 503, a stall past the 1 s read timeout (at most 3 in a row: retries=3), at the first
    # and later requests of a shard: each retried from the byte where the read stopped
    http.stall_seconds = 3.0
    http.faults[:] = ["drop", "ok", "ok", "503", "stall", "ok", "drop", "503", "drop", "ok", "stall"]
    try:
        remote = _one_pass(sources["http"], FAST_RETRIES, errors)
    finally:
        http.faults.clear()
    assert not errors, errors
    assert not http.faults  # every planned fault was met
    assert remote == local
    assert len(set(remote)) == len(remote) == 96


def test_a_shard_that_keeps_failing_is_skipped_and_named(sources):
    http, errors = sources["http_server"], []
    local = _one_pass(sources["local"], FAST_RETRIES, [])
    http.faults[:] = ["503"] * (FAST_RETRIES.retries + 1)  # every try at the first shard read
    try:
        remote = _one_pass(sources["http"], FAST_RETRIES, errors)
    finally:
        http.faults.clear()
    assert len(errors) == 1
    exn, url = errors[0]
    assert isinstance(exn, ShardUnreachableError) and exn.kind == "unreachable_shard"
    assert url.startswith(sources["http"]) and url in str(exn)
    lost = [key for key in local if key not in remote]
    assert len(lost) == 16 and [key for key in local if key in remote] == remote  # one shard of 16, order kept


def test_read_ahead_gives_the_files_bytes_for_any_seek_and_hands_the_next_shard_its_first_block(sources, tiny_shards):
    """RetryingShard's fetcher thread: reads at random offsets and lengths (back, forward inside and past the next
    block, past the end) give the local file's bytes; after a shard is read to its end its fetcher has fetched the
    next shard's first block, which the next shard's reader takes instead of asking for it again."""
    names = ShardSet.open(sources["local"]).urls("train")
    first, second = (Path(name).name for name in names[:2])
    reads = RemoteReads(block_size=4096, timeout=5.0, retries=1, backoff=0.01)
    local = (tiny_shards / first).read_bytes()
    rng = np.random.default_rng(0)
    with RetryingShard(f"{sources['s3']}/{first}", reads) as f:
        for _ in range(200):
            at, n = int(rng.integers(0, len(local) + 100)), int(rng.integers(0, 3 * 4096))
            f.seek(at)
            assert f.read(n) == local[at:at + n], (at, n)
    http, size = sources["http_server"], len(local) + (tiny_shards / second).stat().st_size
    sent = http.bytes_sent
    with RetryingShard(http.url(first), reads, next_url=http.url(second)) as f:
        assert f.read() == local and f.fetched == len(local)
    with RetryingShard(http.url(second), reads) as f:
        assert f.read() == (tiny_shards / second).read_bytes()
        assert f.handed[0] == 4096  # the first block came from the previous shard's fetcher
    assert http.url(second) not in remote_module._handoff
    deadline = time.monotonic() + 10
    while http.bytes_sent - sent < size and time.monotonic() < deadline:
        time.sleep(0.05)  # the server counts a chunk just after sending it
    assert http.bytes_sent - sent == size  # each byte asked for once: the first block was not fetched twice


# ---------------------------------------------------------------------------------------------- the shard tools
def _shards_cli(capsys, *args: str) -> tuple[int, str]:
    code = shards_main(list(args))
    return code, capsys.readouterr().out


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_shards_check_and_stats_read_a_url_as_they_read_the_folder(sources, kind, capsys):
    url = sources[kind].rstrip("/")
    local_code, local_out = _shards_cli(capsys, "check", sources["local"])
    code, out = _shards_cli(capsys, "check", url)
    assert (code, local_code) == (0, 0)
    assert out.replace(url, "ROOT") == local_out.replace(sources["local"], "ROOT")
    assert out.strip().endswith(f"{url}: ok") and "train: 96 images, 480 captions, 6 shards" in out
    _, local_stats = _shards_cli(capsys, "stats", "--json", sources["local"])
    code, stats = _shards_cli(capsys, "stats", "--json", url)
    local_stats, stats = json.loads(local_stats), json.loads(stats)
    assert code == 0 and stats.pop("root") == url and local_stats.pop("root") == sources["local"]
    assert stats == local_stats and stats["splits"]["train"]["images"] == 96


def test_shards_check_names_a_missing_and_a_broken_shard_at_a_url(tiny_shards, tmp_path, capsys):
    broken = tmp_path / "set"
    shutil.copytree(tiny_shards, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    missing, cut = manifest["splits"]["train"]["shards"][:2]
    (broken / missing).unlink()
    (broken / cut).write_bytes((tiny_shards / cut).read_bytes()[:3000])
    with RangeHTTPServer(broken) as http:
        code, out = _shards_cli(capsys, "check", http.url("").rstrip("/"))
        stats_code = shards_main(["stats", http.url("").rstrip("/")])
    assert code == 1
    assert f"{http.url(missing)}: listed in manifest.json for split 'train' but missing" in out
    assert f"{http.url(cut)}: unreadable tar after" in out
    assert "train: 80 images" not in out and out.strip().endswith("problems")
    err = capsys.readouterr().err.strip().splitlines()
    assert stats_code == 2 and len(err) == 1 and http.url(missing) in err[0] and "missing" in err[0], err


@pytest.mark.slow
def test_retrieve_export_indexes_a_url_set_as_the_folder(sources, tiny_shards, tmp_path_factory, tmp_path):
    base = tmp_path_factory.getbasetemp()
    local = RetrievalIndex(exported_index(base, tiny_shards))
    meta = export_index(trained_run(base, tiny_shards), tmp_path / "http", ExportOptions(shards=(sources["http"],)))
    remote = RetrievalIndex(tmp_path / "http")
    assert meta["sets"] == [sources["http"].rstrip("/")] and meta["counts"] == local.meta["counts"]
    np.testing.assert_array_equal(remote.faiss["images"].reconstruct_n(0, 32),
                                  local.faiss["images"].reconstruct_n(0, 32))
    assert [r["image_id"] for r in remote.rows["images"]] == [r["image_id"] for r in local.rows["images"]]
    assert remote.rows["images"][0]["shard"].startswith(sources["http"])
    assert remote.picture(5) == local.picture(5)  # the search page's pictures come from the shard at the URL


def test_extract_features_reads_a_url_set_as_the_folder(sources, tmp_path):
    local = extract(sources["local"], tmp_path / "local", image_size=32, batch_size=32)
    remote = extract(sources["http"], tmp_path / "http", image_size=32, batch_size=32)
    assert remote["image_features"].pop("from_shards") == sources["http"].rstrip("/")
    local["image_features"].pop("from_shards")
    assert remote == local
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "http").iterdir()) and len(names) == 13
    for name in names:
        if name != "manifest.json":
            assert (tmp_path / "http" / name).read_bytes() == (tmp_path / "local" / name).read_bytes(), name


# ---------------------------------------------------------------------------------------------- refused access
SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYzzSECRETzz"  # a secret key set in the environment, never to be printed


def _with_secret(env: dict) -> dict:
    return {**env, "AWS_ACCESS_KEY_ID": "AKIAWRONGKEY0000", "AWS_SECRET_ACCESS_KEY": SECRET}


def test_a_403_over_http_is_refused_before_training_naming_the_url_and_credentials(tiny_shards, tmp_path):
    with RangeHTTPServer(tiny_shards) as http:
        http.deny = True
        result = _train_cli(http.url(), tmp_path, _with_secret(dict(os.environ)))
    line = _refused(result, "data.shards", f"{http.url()}manifest.json", "403", "credentials: none sent")
    assert SECRET not in result.stdout + result.stderr and "AKIAWRONGKEY" not in line
    assert not (tmp_path / "out").exists()


def test_wrong_s3_credentials_are_refused_before_training_never_showing_the_secret(sources, tmp_path):
    s3 = sources["s3_server"]
    s3.require_signatures(True)
    try:
        result = _train_cli(sources["s3"], tmp_path, _with_secret(dict(os.environ)))
    finally:
        s3.require_signatures(False)
    line = _refused(result, "data.shards", f"{sources['s3']}/manifest.json", "PermissionError",
                    "credentials: environment (AWS_ACCESS_KEY_ID)", f"endpoint {s3.endpoint}")
    assert SECRET not in result.stdout + result.stderr and "AKIAWRONGKEY" not in line
    assert not (tmp_path / "out").exists()


PASSWORD = "Pw0rd-kept-SECRET"


def test_a_password_written_in_a_url_is_never_shown(sources, tmp_path, capsys):
    """http://user:PASSWORD@host/... and s3://KEY:SECRET@bucket/...: a config that names one is refused before
    anything is read or written (config.yaml would keep it), in one line that names the URL with *** for the
    password and where credentials go; `shards check` of a readable one (no config) says ok, the same way."""
    with RangeHTTPServer(sources["local"]) as http:
        url = http.url().replace("http://", f"http://alice:{PASSWORD}@")
        code, out = _shards_cli(capsys, "check", url.rstrip("/"))
        assert code == 0 and out.strip().endswith(f"{http.base_url.replace('http://', 'http://alice:***@')}: ok")
        assert PASSWORD not in out + capsys.readouterr().err
        requests_before = http.bytes_sent
        result = _train_cli(url, tmp_path, dict(os.environ))
        assert http.bytes_sent == requests_before  # refused from the config alone
    _refused(result, "data.shards", "http://alice:***@127.0.0.1", "~/.netrc", "config.yaml")
    assert PASSWORD not in result.stdout + result.stderr and not (tmp_path / "out").exists()
    secret = f"{PASSWORD}/with/slashes"  # AWS secret keys hold '/'
    result = _train_cli(sources["s3"].replace("s3://", f"s3://AKIAKEY:{secret}@"), tmp_path, dict(os.environ))
    _refused(result, "data.shards", "s3://AKIAKEY:***@corpus/tiny/v1", "AWS_SECRET_ACCESS_KEY")
    assert PASSWORD not in result.stdout + result.stderr and "slashes" not in result.stderr


def test_http_credentials_come_from_netrc(tiny_shards, tmp_path, capsys, monkeypatch):
    """A set behind HTTP basic auth: without a login it is refused in one line saying where one goes; with the
    host's login in the file NETRC names it is read (and nothing of it is shown)."""
    with RangeHTTPServer(tiny_shards) as http:
        http.credentials = ("alice", PASSWORD)
        netrc_file = tmp_path / "netrc"
        netrc_file.write_text("")
        monkeypatch.setenv("NETRC", str(netrc_file))
        code, err = shards_main(["check", http.url().rstrip("/")]), capsys.readouterr().err.strip()
        assert code == 2 and "401" in err and "credentials: none sent" in err and "~/.netrc" in err, err
        assert len(err.splitlines()) == 1, err
        netrc_file.write_text(f"machine 127.0.0.1 login alice password {PASSWORD}\n")
        netrc_file.chmod(0o600)
        code, out = _shards_cli(capsys, "check", http.url().rstrip("/"))
        assert code == 0 and out.strip().endswith(": ok"), out
        assert PASSWORD not in out + capsys.readouterr().err
        netrc_file.write_text("machine 127.0.0.1 login alice password wrong\n")
        code, err = shards_main(["check", http.url().rstrip("/")]), capsys.readouterr().err.strip()
        assert code == 2 and f"in {netrc_file}, refused" in err and "wrong" not in err, err


# ---------------------------------------------------------------------------------------------- kill and resume
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["http", "s3"])
def test_a_run_over_the_network_killed_and_resumed_ends_with_the_uninterrupted_parameters(sources, kind, tmp_path):
    """One process, 12 steps, a checkpoint every 2, shards from the HTTP server or the S3 server (test_faults'
    exact-resume test, over the network): SIGKILL after step 3, `--resume latest` to the end; the exported weights
    are bit-identical to an uninterrupted run's over the same URL, and the resumed run re-read its buffer over the
    network (HTTP Range, S3 ranged GETs)."""
    url, ref, run = sources[kind], tmp_path / "reference", tmp_path / "interrupted"
    wait_all([start(train_cmd(url, ref), clean_env(), tmp_path / "reference.log")], [tmp_path / "reference.log"], 300)
    assert logged_steps(ref) == list(range(1, RUN_STEPS + 1))

    procs, logs = [start(train_cmd(url, run), clean_env(), tmp_path / "killed.log")], [tmp_path / "killed.log"]
    wait_for_logged(run, 3, procs, logs)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=30)
    killed = logged_steps(run)
    resumed_from = int(checkpoint.find(run / "checkpoints", "latest")[0][4:])
    assert 2 <= resumed_from <= killed[-1] < RUN_STEPS

    log = tmp_path / "resumed.log"
    wait_all([start(train_cmd(url, run, "--resume", "latest"), clean_env(), log)], [log], 300)
    assert logged_steps(run) == killed + list(range(resumed_from + 1, RUN_STEPS + 1))
    back = re.search(r"data stream back in position: ([\d.]+) MB re-read", log.read_text())
    assert back and float(back.group(1)) > 0, log.read_text()[-3000:]

    expected = export(ref, tmp_path / "ref.pt")["state_dict"]
    got = export(run, tmp_path / "run.pt")["state_dict"]
    assert expected.keys() == got.keys() and len(got) > 10
    differ = [k for k in got if not torch.equal(got[k], expected[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}"


# ---------------------------------------------------------------------------------------------- the README's lines
def test_the_readme_object_store_lines_pass_the_checks_and_give_batches(sources, tiny_shards, tmp_path):
    """Each line of the README's "Pretraining from an object store" block, as written, with its bucket on the S3
    server (the same URL), its host replaced by the HTTP server's and its folder by the tiny set's: the config
    check before training passes and the training stream gives a batch (with the pipe: set in it)."""
    s3 = sources["s3_server"]
    s3.upload(tiny_shards, "bucket", "builtin")
    lines = readme_block(STORE_HEADING)
    assert [line.split()[:4] for line in lines] == [["python", "-m", "trainer.train", "--config"]] * 3
    for line in lines:
        line = line.replace("https://host/sets/builtin", sources["http"]).replace("/data/cc", str(tiny_shards))
        argv = shlex.split(line)[3:] + [f"run.out_dir={tmp_path / 'run'}", *TINY, "data.num_workers=0"]
        if "data.shards=" not in line:  # configs/builtin.yaml's data/builtin, which `make run` builds
            argv.append(f"data.shards={tiny_shards}")
        cfg = resolved_config(parse_args(argv), check_paths=True)
        shardset = ShardSet.open(cfg.data.shards)
        mix = mix_sets(shardset, cfg.data.mix_shards, cfg.data.mix_weights, cfg.data.train_split)
        loader = TrainLoader(build_train_stream(cfg, shardset, rank=0, world_size=1, mix=mix), num_workers=0)
        batch = _image_ids(loader, 1)[0]
        assert len(batch) == 8, line
        assert not cfg.data.mix_shards or cfg.data.mix_shards[0].startswith(f"pipe:cat {tiny_shards}/"), line


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_vocab_from_a_set_at_a_url_shares_its_vocabularies_byte_for_byte(sources, kind, tmp_path, capsys):
    out = tmp_path / "held_out"
    assert shards_main(["build", "--source", "builtin", "--seed", "5", "--out", str(out), "--train-images", "8",
                        "--val-images", "4", "--test-images", "4", "--vocab-from", sources[kind]]) == 0
    for name in ("concepts.json", "vocab.json"):
        assert (out / name).read_bytes() == (Path(sources["local"]) / name).read_bytes()
    assert json.loads((out / "manifest.json").read_text())["vocab_from"]["path"] == sources[kind].rstrip("/")
    capsys.readouterr()  # the first build's progress
    missing = sources[kind].rstrip("/") + "-nowhere"
    assert shards_main(["build", "--source", "builtin", "--out", str(tmp_path / "x"), "--train-images", "8",
                        "--vocab-from", missing]) == 2
    err = capsys.readouterr().err.strip()
    assert "--vocab-from" in err and "nowhere" in err and len(err.splitlines()) == 1, err
