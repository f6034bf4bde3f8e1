"""Issue 24 point 5: `python -m shards build ... --out s3://bucket/prefix` (and any fsspec URL that can write), against
moto's S3-compatible server on 127.0.0.1 (tests/helpers/remote_servers.py). The store ends up holding the local
build's files byte for byte; the loader trains from it and `shards check` says ok; a build interrupted midway
leaves only complete shards (and its options record, no manifest) in the store, and `--resume` finishes it,
re-writing only what is missing or wrong; a store that cannot be written is refused in one line."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from conftest import build_builtin
from remote_servers import S3Server
from test_remote_shards import BATCHES, _image_ids, _loader

from shards.__main__ import main as shards_main
from shards.writer import ShardSetWriter

TINY_SET = (96, 32, 32, 16)  # tiny_shards' sizes (tests/conftest.py): the same build, to compare byte for byte


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server with the AWS_* environment a client of it needs (credentials from the environment only)."""
    with S3Server() as server, pytest.MonkeyPatch.context() as env:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            env.delenv(key)
        for key, value in server.env().items():
            env.setenv(key, value)
        server.client().create_bucket(Bucket="store")
        yield server


def _objects(s3: S3Server, prefix: str) -> dict[str, bytes]:
    """{name: bytes} of every object under s3://store/prefix/."""
    client = s3.client()
    listed = client.list_objects_v2(Bucket="store", Prefix=f"{prefix}/").get("Contents", [])
    return {o["Key"][len(prefix) + 1:]: client.get_object(Bucket="store", Key=o["Key"])["Body"].read() for o in listed}


def _folder(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def test_a_build_to_s3_holds_the_local_build_byte_for_byte_and_trains(s3, tiny_shards, tmp_path, capsys):
    url = build_builtin("s3://store/tiny/v1", *TINY_SET)
    capsys.readouterr()
    assert _objects(s3, "tiny/v1") == _folder(tiny_shards)  # no build record, no .partial: the set and only it
    assert shards_main(["check", url]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{url}: ok")
    assert _image_ids(_loader(url, tmp_path), BATCHES) == _image_ids(_loader(str(tiny_shards), tmp_path), BATCHES)


def test_an_interrupted_build_to_s3_leaves_whole_shards_and_resumes(s3, tiny_shards, monkeypatch, capsys):
    url, written, real_write = "s3://store/cut", [], ShardSetWriter.write
    stop_after: list[int | None] = [40]  # inside the third train shard of 16

    def write(self, split, sample, *rest):
        if stop_after[0] is not None and len(written) == stop_after[0]:
            raise KeyboardInterrupt  # the build is killed while it writes a shard
        written.append(sample.image_id)
        real_write(self, split, sample, *rest)
    monkeypatch.setattr(ShardSetWriter, "write", write)
    assert build_builtin_code(url) == 130
    assert "--resume" in capsys.readouterr().err
    local = _folder(tiny_shards)
    stored = _objects(s3, "cut")
    # the two finished shards and the options record; not the third, half written one, nor any manifest
    assert sorted(stored) == ["build.partial.json", "builtin-train-000000.tar", "builtin-train-000001.tar"]
    assert all(stored[name] == local[name] for name in stored if name.endswith(".tar"))
    assert build_builtin_code(url) == 2  # not empty: refused without --resume
    assert "--resume" in capsys.readouterr().err

    written.clear()
    stop_after[0] = None
    assert build_builtin_code(url, "--resume") == 0
    assert "kept 2 finished shards, wrote 8" in capsys.readouterr().out
    assert len(written) == 96 + 32 + 32 - 32  # the kept shards' samples are not written again
    assert _objects(s3, "cut") == local

    # killed after its last shard, before the manifest (simulated), with a shard gone: only that one is written
    client = s3.client()
    client.put_object(Bucket="store", Key="cut/build.partial.json", Body=stored["build.partial.json"])
    for name in ("manifest.json", "builtin-val-000001.tar"):
        client.delete_object(Bucket="store", Key=f"cut/{name}")
    written.clear()
    assert build_builtin_code(url, "--resume") == 0
    assert "kept 9 finished shards, wrote 1" in capsys.readouterr().out
    assert len(written) == 16 and _objects(s3, "cut") == local
    assert shards_main(["check", url]) == 0


def build_builtin_code(out: str, *extra: str) -> int:
    """The exit code of the tiny set's build to `out` (conftest.build_builtin asserts success)."""
    return shards_main(["build", "--source", "builtin", "--out", out, "--train-images", "96", "--val-images", "32",
                        "--test-images", "32", "--shard-size", "16", "--min-concept-count", "2", *extra])


def test_a_build_to_a_file_url_renames_each_shard_into_place(tiny_shards, tmp_path):
    out = tmp_path / "via-url"
    build_builtin(f"file://{out}", *TINY_SET)
    assert _folder(out) == _folder(tiny_shards)


def test_a_store_that_cannot_be_written_is_refused_in_one_line(s3, capsys):
    assert build_builtin_code("s3://no-such-bucket/set") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write s3://no-such-bucket/set/build.partial.json" in err[0], err
    assert "credentials: environment" in err[0] and "testing" not in err[0].replace("credentials: environment", "")
    assert build_builtin_code("https://host/sets/x") == 2
    assert "an http(s) URL cannot be written" in capsys.readouterr().err
