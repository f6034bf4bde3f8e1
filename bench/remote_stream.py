"""Remote shard streaming: raw samples/s per worker from local disk, from an HTTP server with Range support and from
an S3-compatible server (moto) on 127.0.0.1, on the same shard set, and the bytes fetched per byte read.

"per worker": one `RawStream` (trainer.data.shardstream) in this process reading one pass over the train split's
shards in order (shuffle buffer of 1): tar members grouped into raw samples, no decoding - what the network
path changes. "bytes fetched": the byte ranges asked of the server (the read-ahead thread's requests, counted by each
`RetryingShard`), "bytes read": the shards' sizes; the HTTP server's own count of body bytes sent is shown beside.
The servers run in a child process, so they do not share this process's interpreter lock. Sources alternate in
rounds (the machine is shared); medians. Goal (issue 24), on loopback: >= 0.9 x local per worker, <= 1.02 bytes
fetched per byte read.

Exact command (from the repository root; about a minute on 2 shared CPU cores):

    python bench/remote_stream.py                      # builds a builtin shard set in a temp dir
    python bench/remote_stream.py --shards data/builtin --rounds 5 --block-mb 8

Output: a table, then as the last line one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests" / "helpers"))

from remote_servers import RangeHTTPServer, S3Server  # noqa: E402
from step import build_bench_shards  # noqa: E402

import trainer.data.shardstream as shardstream  # noqa: E402
from shards.remote import RemoteReads, open_shard  # noqa: E402
from trainer.data.shardset import ShardSet  # noqa: E402
from trainer.data.shardstream import Identity, RawStream  # noqa: E402

SERVER_START = 120.0  # seconds the child may take to start both servers and upload the set


def serve(root: str, ready, stop, http_sent) -> None:
    """The child process: both servers up, the set uploaded, their addresses sent, until `stop` (at most an hour)."""
    with RangeHTTPServer(root) as http, S3Server() as s3:
        os.environ.update(s3.env())
        url = s3.upload(root, "bench", "set")
        ready.put({"http": http.url(), "s3": url, "env": s3.env()})
        deadline = time.monotonic() + 3600
        while not stop.wait(0.2) and time.monotonic() < deadline:
            http_sent.value = http.bytes_sent
        http_sent.value = http.bytes_sent


def fail(exn: Exception, url: str | None) -> bool:
    raise RuntimeError(f"{url}: {exn}") from exn  # a benchmark pass must read every sample


def one_pass(location: str, reads: RemoteReads, shard_bytes: int) -> dict:
    """samples/s, MB/s and bytes fetched / read of one worker's pass over the train split (shard_bytes: the
    split's shard sizes, what a pass reads)."""
    urls = ShardSet.open(location).urls("train")
    opened = []

    def counting_open(url, reads=None, next_url=None):  # every shard file the stream opens, to add up its fetches
        f = open_shard(url, reads, next_url)
        opened.append(f)
        return f

    stream = RawStream([urls], [1.0], resampled=False, shuffle_buffer=1, who=Identity(0, 1, 0, 1, 0),
                       handler=fail, passes=1, reads=reads)
    shardstream.open_shard, saved = counting_open, shardstream.open_shard
    try:
        start = time.perf_counter()
        samples = sum(1 for _ in stream.samples())
        seconds = time.perf_counter() - start
    finally:
        shardstream.open_shard = saved
    fetched = sum(getattr(f, "fetched", 0) for f in opened) or shard_bytes  # a local file: what it read
    return {"samples_per_s": samples / seconds, "mb_per_s": shard_bytes / seconds / 1e6, "samples": samples,
            "bytes_read": shard_bytes, "bytes_fetched": fetched}


def measure(root: Path, args: argparse.Namespace) -> dict:
    ctx = multiprocessing.get_context("spawn")
    ready, stop, http_sent = ctx.Queue(), ctx.Event(), ctx.Value("q", 0)
    child = ctx.Process(target=serve, args=(str(root), ready, stop, http_sent), daemon=True)
    child.start()
    try:
        got = ready.get(timeout=SERVER_START)
    except Exception as e:
        child.kill()
        raise RuntimeError(f"the HTTP and S3 servers did not start within {SERVER_START} s") from e
    os.environ.update(got["env"])
    reads = RemoteReads(block_size=args.block_mb * 2**20)
    sources = {"local": str(root), "http": got["http"], "s3": got["s3"]}
    runs: dict[str, list[dict]] = {k: [] for k in sources}
    shard_bytes = sum(os.path.getsize(url) for url in ShardSet.open(root).urls("train"))
    try:
        for _ in range(args.rounds):
            for kind, location in sources.items():
                runs[kind].append(one_pass(location, reads, shard_bytes))
    finally:
        stop.set()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    return {"runs": runs, "http_bytes_sent": http_sent.value}


def report(out: dict, args: argparse.Namespace) -> None:
    runs = out["runs"]
    local = statistics.median(r["samples_per_s"] for r in runs["local"])
    summary = {"rounds": args.rounds, "block_mb": args.block_mb, "samples_per_pass": runs["local"][0]["samples"],
               "bytes_per_pass": runs["local"][0]["bytes_read"], "http_server_bytes_sent": out["http_bytes_sent"]}
    print(f"{'source':8} {'samples/s':>10} {'MB/s':>8} {'x local':>8} {'fetched/read':>13}")
    for kind, rs in runs.items():
        rate = statistics.median(r["samples_per_s"] for r in rs)
        mbs = statistics.median(r["mb_per_s"] for r in rs)
        ratio = sum(r["bytes_fetched"] for r in rs) / sum(r["bytes_read"] for r in rs)
        print(f"{kind:8} {rate:10.0f} {mbs:8.1f} {rate / local:8.2f} {ratio:13.4f}")
        summary.update({f"{kind}_samples_per_s": round(rate, 1), f"{kind}_mb_per_s": round(mbs, 2),
                        f"{kind}_x_local": round(rate / local, 3), f"{kind}_fetched_per_read": round(ratio, 4)})
    print(json.dumps(summary))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=Path, help="a shard-set folder (default: build a builtin one)")
    parser.add_argument("--train-images", type=int, default=8000)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--block-mb", type=int, default=RemoteReads().block_size // 2**20)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.shards or build_bench_shards(Path(tmp) / "builtin", args.train_images, args.shard_size)
        report(measure(root, args), args)


if __name__ == "__main__":
    main()
