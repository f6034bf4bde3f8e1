"""The training stream at scale (issue 13), in one run and as ratios:

1. read amplification: raw samples read from shards per sample trained, in steady state (after each worker's
   first batch, which fills its shuffle buffer once), for R ranks x W workers simulated in this process (every
   rank's and worker's own pipeline, `TrainStream.worker_batches` with that identity, run one after another),
   over a shard set of >= 100,000 small samples (every worker of evenly spread ranks, --max-pipelines in all,
   each past one epoch boundary). Goal <= 1.05. Beside it, what the buffer fill would cost if it
   were paid every epoch (the stream before issue 13) for the same epoch size;
2. worker starts and time to the first batch of a real DataLoader (`TrainLoader`, W worker processes of one
   rank) run for several epochs, and again on resume. Goal: W starts per rank (R x W per run), once;
3. per-worker decode rate of photo-like 640x480 JPEGs (made with PIL) at 224 px through `trainer.data.decode`
   against a bare PIL open + draft + resize loop on the same files, one thread. Goal >= 0.8x;
4. resume after 10,000 steps: one rank's workers (simulated in process) run 10,000 steps, then a new stream is
   put back in position from the saved state: bytes re-read, seconds, time to the first batch, and a check that
   the next batches are the ones the uninterrupted stream gives.

The shard set is built once and cached under data/bench-scale-<N>/ (the built-in corpus at 32 px, its pictures
copied under new keys into shards of 1,000).

Exact command (from the repository root; a few minutes on 2 shared CPU cores):

    .venv/bin/python bench/data_scale.py

Output: a table, then as the last line one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import statistics
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shards.__main__ import main as shards_main  # noqa: E402
from trainer.data.decode import decode_image  # noqa: E402
from trainer.data.loader import TrainLoader  # noqa: E402
from trainer.data.shardset import ShardSet  # noqa: E402
from trainer.data.shardstream import StreamState  # noqa: E402
from trainer.data.stream import StreamSettings, TrainStream  # noqa: E402

SHARD_SIZE = 1000


# ------------------------------------------------------------------------------------------------ the shard set

def build_scale_set(out: Path, samples: int) -> Path:
    """`samples` train samples (and small val/test splits) made from a built-in corpus of 1,000 pictures at 16 px,
    each copied under a new key and image id; cached: reused when its manifest is there."""
    if (out / "manifest.json").is_file():
        return out
    base = out.with_name(out.name + "-base")
    shutil.rmtree(base, ignore_errors=True)
    code = shards_main(["build", "--source", "builtin", "--out", str(base), "--train-images", "1000",
                        "--val-images", "50", "--test-images", "50", "--shard-size", "1000", "--image-size", "32",
                        "--spacy-pipeline", "blank", "--min-concept-count", "2"])
    if code not in (0, None):
        raise RuntimeError(f"building {base} failed ({code})")
    manifest = json.loads((base / "manifest.json").read_text())
    originals = []
    for name in manifest["splits"]["train"]["shards"]:
        with tarfile.open(base / name) as tar:
            members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers() if m.isfile()]
        by_key: dict[str, dict] = {}
        for member, data in members:
            key, ext = member.split(".", 1)
            by_key.setdefault(key, {})[ext] = data
        originals += list(by_key.values())
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    for name in manifest["splits"]["train"]["shards"]:
        (tmp / name).unlink()
    shard_names = []
    for shard in range((samples + SHARD_SIZE - 1) // SHARD_SIZE):
        name = f"scale-train-{shard:06d}.tar"
        shard_names.append(name)
        with tarfile.open(tmp / name, "w") as tar:
            for i in range(shard * SHARD_SIZE, min(samples, (shard + 1) * SHARD_SIZE)):
                sample = originals[i % len(originals)]
                key = f"s{i:07d}"
                meta = dict(json.loads(sample["json"]), image_id=key)
                for ext, data in (("png", sample["png"]), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    manifest["splits"]["train"].update(shards=shard_names, images=samples)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    tmp.rename(out)
    shutil.rmtree(base, ignore_errors=True)
    return out


def stream(shardset: ShardSet, rank: int, world: int, args, **kw) -> TrainStream:
    options = dict(batch_size=args.batch_size, image_size=16, max_words=16, shuffle_buffer=args.buffer,
                   resampled=True, seed=0, epoch_samples=args.epoch_samples)
    options.update(kw)
    return TrainStream(shardset, "train", StreamSettings(**options), rank=rank, world_size=world)


# ------------------------------------------------------------------------------------------------ 1. amplification

def amplification(shardset: ShardSet, ranks: int, workers: int, args) -> dict:
    """Raw reads per trained sample of (rank, worker) pipelines of R x W: every worker of up to max_pipelines / W
    ranks spread evenly over the R (the figure is the same for every pipeline in expectation; simulating all 1,024
    of 128 x 8 would take an hour on two shared cores). Each runs its first batch (the buffer fill) and then a
    steady window of one epoch's share plus one batch, so the window crosses an epoch boundary."""
    start = time.perf_counter()
    per_worker = max(1, -(-stream(shardset, 0, ranks, args).epoch_batches // workers))  # one worker's epoch
    window = per_worker + 1
    step = max(1, ranks * workers // args.max_pipelines)
    chosen = list(range(0, ranks, step))
    fill = steady_read = steady_trained = 0
    epochs_seen = set()
    for rank in chosen:
        s = stream(shardset, rank, ranks, args)
        for worker in range(workers):
            it = s.worker_batches(worker, workers, endless=True)
            for i in range(1 + window):
                batch = next(it)
                if i == 0:
                    fill += int(batch["raw_read"])
                else:
                    steady_read += int(batch["raw_read"])
                    steady_trained += batch["images"].shape[0]
                # rank batch j comes from worker j % W: its epoch label
                epochs_seen.add((i * workers + worker) // s.epoch_batches)
            it.close()
    pipelines = len(chosen) * workers
    epoch_share = per_worker * args.batch_size  # samples one worker trains per epoch
    return {"ranks": ranks, "workers": workers, "pipelines": ranks * workers, "simulated": pipelines,
            "batch_size": args.batch_size, "buffer": args.buffer, "epoch_samples": args.epoch_samples,
            "batches_per_worker_epoch": per_worker, "steady_batches_per_worker": window,
            "epochs_crossed": len(epochs_seen) - 1,
            "steady_read_per_trained": steady_read / steady_trained,
            "first_batch_read_per_worker": fill / pipelines,
            "refill_every_epoch_read_per_trained": (args.buffer + epoch_share) / epoch_share,
            "seconds": time.perf_counter() - start}


# ------------------------------------------------------------------------------------------------ 2. worker starts

def worker_starts(shardset: ShardSet, args) -> dict:
    s = stream(shardset, 0, 1, args, epoch_samples=args.batch_size * args.loader_workers * 2)
    start = time.perf_counter()
    batches = TrainLoader(s, args.loader_workers)
    epochs = [next(batches)[0]]
    first = time.perf_counter() - start
    while epochs[-1] < args.loader_epochs - 1:
        epochs.append(next(batches)[0])
    state = batches.state_dict()
    starts = batches.worker_starts
    batches.close()
    s2 = stream(shardset, 0, 1, args, epoch_samples=args.batch_size * args.loader_workers * 2)
    start = time.perf_counter()
    resumed = TrainLoader(s2, args.loader_workers)
    resumed.load_state_dict(state)
    next(resumed)
    first_resumed = time.perf_counter() - start
    out = {"workers": args.loader_workers, "epochs": args.loader_epochs, "batches": len(epochs),
           "worker_starts": starts, "first_batch_seconds": first, "resume_worker_starts": resumed.worker_starts,
           "resume_first_batch_seconds": first_resumed}
    resumed.close()
    return out


# ------------------------------------------------------------------------------------------------ 3. decode rate

def photo_like(rng: np.random.Generator, width: int = 640, height: int = 480) -> bytes:
    """A JPEG with the statistics of a photograph more than of noise: a smooth colour field, shapes, texture."""
    field = Image.fromarray(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(field)
    for _ in range(12):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(10, 120))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=colour)
    field = field.filter(ImageFilter.GaussianBlur(1.5))
    noise = rng.normal(0, 6, (height, width, 3))
    pixels = np.clip(np.asarray(field, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG", quality=90)
    return out.getvalue()


def bare_pil(data: bytes, size: int) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (size, size))
    return img.resize((size, size), Image.BILINEAR)


def decode_rate(args) -> dict:
    rng = np.random.default_rng(0)
    files = [photo_like(rng) for _ in range(args.photos)]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every loader worker runs (trainer.data.loader._worker_init)
    rounds = []
    try:
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            for data in files:
                bare_pil(data, 224)
            t1 = time.perf_counter()
            for data in files:
                decode_image(data, 224)
            t2 = time.perf_counter()
            rounds.append((len(files) / (t1 - t0), len(files) / (t2 - t1)))
    finally:
        torch.set_num_threads(threads)
    bare = statistics.median(r[0] for r in rounds)
    ours = statistics.median(r[1] for r in rounds)
    return {"photos": len(files), "size": "640x480", "target": 224,
            "mean_jpeg_bytes": sum(map(len, files)) / len(files), "bare_pil_per_s": bare, "decode_image_per_s": ours,
            "ratio": ours / bare, "rounds": rounds}


# ------------------------------------------------------------------------------------------------ 4. resume

def resume_cost(shardset: ShardSet, args) -> dict:
    """One rank's W workers, simulated in process in the DataLoader's order (batch j from worker j % W)."""
    workers = args.resume_workers
    s = stream(shardset, 0, args.resume_world, args, batch_size=args.resume_batch, shuffle_buffer=args.resume_buffer)
    its = [s.worker_batches(w, workers, endless=True) for w in range(workers)]
    states: list = [None] * workers
    start = time.perf_counter()
    for step in range(args.steps):
        batch = next(its[step % workers])
        states[step % workers] = batch["stream_state"]
    run_seconds = time.perf_counter() - start
    expected = [next(its[(args.steps + k) % workers])["image_ids"].tolist() for k in range(2 * workers)]
    saved = [StreamState.from_dict(st.to_dict()) for st in states]  # through plain values, as in a checkpoint
    start = time.perf_counter()
    back = [s.worker_batches(w, workers, saved[w], endless=True) for w in range(workers)]
    got, restore_bytes, restore_seconds, first = [], 0, [], None
    for k in range(2 * workers):
        batch = next(back[(args.steps + k) % workers])
        if first is None:
            first = time.perf_counter() - start
        if "restore_bytes" in batch:
            restore_bytes += int(batch["restore_bytes"])
            restore_seconds.append(float(batch["restore_seconds"]))
        got.append(batch["image_ids"].tolist())
    buffer_refs = sum(len(st.buffer) for st in saved)
    return {"steps": args.steps, "workers": workers, "batch_size": args.resume_batch, "buffer": args.resume_buffer,
            "run_seconds": run_seconds, "bytes_reread": restore_bytes, "buffer_samples_reread": buffer_refs,
            "shard_bytes": Path(shardset.urls("train")[0]).stat().st_size,
            "restore_seconds_per_worker_max": max(restore_seconds), "restore_seconds_all": sum(restore_seconds),
            "first_batch_seconds": first, "exact": got == expected}


# ------------------------------------------------------------------------------------------------ report

def report(out: dict) -> None:
    print(f"shard set: {out['samples']} samples in shards of {SHARD_SIZE} ({out['shards']})")
    print(f"{'R x W':>9} {'simulated':>9} {'read/trained (steady)':>22} {'if refilled each epoch':>23} "
          f"{'fill/worker':>11} {'s':>6}")
    for a in out["amplification"]:
        print(f"{a['ranks']:>4} x {a['workers']:<2} {a['simulated']:>4}/{a['pipelines']:<4} "
              f"{a['steady_read_per_trained']:>22.4f} "
              f"{a['refill_every_epoch_read_per_trained']:>23.2f} {a['first_batch_read_per_worker']:>11.0f} "
              f"{a['seconds']:>6.1f}")
    w = out["worker_starts"]
    print(f"DataLoader, 1 rank x {w['workers']} workers, {w['epochs']} epochs ({w['batches']} batches): "
          f"{w['worker_starts']} worker starts, first batch after {w['first_batch_seconds']:.2f} s; "
          f"resumed: {w['resume_worker_starts']} starts, first batch after {w['resume_first_batch_seconds']:.2f} s")
    d = out["decode"]
    print(f"decode 640x480 JPEG -> 224, one thread: decode_image {d['decode_image_per_s']:.0f}/s, bare PIL "
          f"open+draft+resize {d['bare_pil_per_s']:.0f}/s, ratio {d['ratio']:.2f} (goal >= 0.8)")
    r = out["resume"]
    print(f"resume after {r['steps']} steps ({r['workers']} workers, buffer {r['buffer']}): "
          f"{r['bytes_reread'] / 1e6:.2f} MB re-read ({r['buffer_samples_reread']} buffered samples; a shard is "
          f"{r['shard_bytes'] / 1e6:.2f} MB), {r['restore_seconds_per_worker_max']:.3f} s per worker, "
          f"first batch after {r['first_batch_seconds']:.3f} s, exact: {r['exact']}")
    goals = {"read_per_trained_le_1.05": all(a["steady_read_per_trained"] <= 1.05 for a in out["amplification"]),
             "worker_starts_once": w["worker_starts"] == w["workers"] and w["resume_worker_starts"] == w["workers"],
             "decode_ratio_ge_0.8": d["ratio"] >= 0.8, "resume_exact": r["exact"]}
    print("goals: " + ", ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items()))
    print(json.dumps({**out, "goals": goals}, default=float))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=100_000, help="train samples of the cached shard set")
    p.add_argument("--data", type=Path, default=REPO / "data")
    p.add_argument("--scales", default="16x4,128x8", help="R x W pairs to simulate")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--buffer", type=int, default=1000, help="shuffle buffer per worker in the simulation")
    p.add_argument("--epoch-samples", type=int, default=100_000, help="global epoch size")
    p.add_argument("--max-pipelines", type=int, default=16, help="pipelines simulated per R x W (all workers of "
                   "evenly spread ranks)")
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--loader-epochs", type=int, default=4)
    p.add_argument("--photos", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10_000, help="steps before the resume is measured")
    p.add_argument("--resume-workers", type=int, default=2)
    p.add_argument("--resume-world", type=int, default=8, help="world size of the resumed rank's stream")
    p.add_argument("--resume-batch", type=int, default=2, help="small: the 10,000 steps are decoded for real")
    p.add_argument("--resume-buffer", type=int, default=2000)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    root = build_scale_set(args.data / f"bench-scale-{args.samples}", args.samples)
    shardset = ShardSet.open(root)
    out = {"samples": shardset.split_info("train")["images"], "shards": len(shardset.urls("train"))}
    out["amplification"] = []
    for pair in args.scales.split(","):
        ranks, workers = (int(x) for x in pair.lower().split("x"))
        print(f"simulating {ranks} x {workers} ...", file=sys.stderr, flush=True)
        out["amplification"].append(amplification(shardset, ranks, workers, args))
    print("loader ...", file=sys.stderr, flush=True)
    out["worker_starts"] = worker_starts(shardset, args)
    print("decode ...", file=sys.stderr, flush=True)
    out["decode"] = decode_rate(args)
    print(f"resume after {args.steps} steps ...", file=sys.stderr, flush=True)
    out["resume"] = resume_cost(shardset, args)
    report(out)


if __name__ == "__main__":
    main()
