"""Evaluation cost at COCO-5K size: the trainer's scoring code against the bare matrix product, and SCAN.

"ours": `trainer.evaluate.score_embeddings` (what every evaluation runs: `metrics.evaluate_embeddings` for the
global, local and concatenated scores, both directions, plus chance level) on 5,000 pictures x 25,000 captions
with global and local vectors of 1,024 dimensions each (the concatenated retrieval vector has 2,048).
"bare": one `torch.mm` of the concatenated vectors [5,000 x 2,048] x [2,048 x 25,000] and `topk(10)` along both
axes: the least any R@1/5/10 evaluation of one score must do, and it holds the whole 500 MB score matrix.
Goal (issue 7): ours <= 1.3 x bare in time, with memory bounded by chunking (peak extra memory is reported:
the increase of VmHWM over the RSS right before the call, malloc's mmap threshold at 64 KiB so that freed
tensors leave RSS at once; this script re-executes itself with that setting).

"SCAN": the t2i cross-attention scorer of SCAN (Lee et al. 2018), which needs a forward pass per (caption,
picture) pair: 36 region vectors per picture, 12 word vectors per caption, 1,024-d; for each word the cosine
with every region, softmax over regions of lambda x cosine (lambda = 9), the attended region vector, its cosine
with the word, the mean over words. Timed on a sample of pairs and extrapolated to 5,000 x 25,000 pairs.

The two loops run in alternating rounds in one process (the machine is shared: only side-by-side figures
compare); the ratio is the median of the per-round ratios.

Exact command (from the repository root; about 3 minutes on 2 shared CPU cores):

    python bench/retrieval.py --rounds 2

Output: a table, then as the last line one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from loss_scaling import measure_peak_increase  # noqa: E402

from trainer.eval.evaluation import score_embeddings  # noqa: E402

MB = 2**20
MMAP_THRESHOLD = "65536"


def make_embeddings(images: int, caps_per_image: int, dim: int, seed: int) -> dict:
    """Normalised global and local vectors, captions noisy copies of their picture (so recalls are not chance)."""
    gen = torch.Generator().manual_seed(seed)
    cap_to_img = torch.arange(images).repeat_interleave(caps_per_image)
    emb = {"cap_to_img": cap_to_img}
    for space in ("g", "l"):
        img = F.normalize(torch.randn(images, dim, generator=gen), dim=1)
        cap = F.normalize(img[cap_to_img] + 8.0 * torch.randn(cap_to_img.numel(), dim, generator=gen) / dim**0.5,
                          dim=1)
        emb[f"img_{space}"], emb[f"cap_{space}"] = img, cap
    return emb


def bare_product(img: torch.Tensor, cap: torch.Tensor, k: int = 10) -> None:
    scores = torch.mm(img, cap.T)
    scores.topk(k, dim=1)
    scores.topk(k, dim=0)


def scan_t2i(words: torch.Tensor, regions: torch.Tensor, lam: float = 9.0) -> torch.Tensor:
    """SCAN t2i scores [captions, images] of words [Bc, W, D] against regions [Bi, R, D]."""
    w = F.normalize(words, dim=-1)
    r = F.normalize(regions, dim=-1)
    cosine = torch.einsum("cwd,ird->ciwr", w, r)  # every word against every region of every picture
    attention = torch.softmax(lam * cosine, dim=-1)
    attended = torch.einsum("ciwr,ird->ciwd", attention, regions)
    relevance = F.cosine_similarity(words.unsqueeze(1), attended, dim=-1)  # [Bc, Bi, W]
    return relevance.mean(dim=-1)


def time_scan(args: argparse.Namespace) -> dict:
    gen = torch.Generator().manual_seed(args.seed + 1)
    words = torch.randn(args.scan_captions, args.words, args.dim, generator=gen)
    regions = torch.randn(args.scan_images, args.regions, args.dim, generator=gen)
    scan_t2i(words[:2], regions[:2])  # warm-up
    pairs, start = 0, time.perf_counter()
    while pairs == 0 or time.perf_counter() - start < args.scan_seconds:
        scan_t2i(words, regions)
        pairs += args.scan_captions * args.scan_images
    seconds = time.perf_counter() - start
    total_pairs = args.images * args.images * args.caps_per_image
    return {"scan_pairs_timed": pairs, "scan_seconds": seconds, "scan_pairs_per_s": pairs / seconds,
            "scan_extrapolated_s": total_pairs * seconds / pairs, "total_pairs": total_pairs}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    emb = make_embeddings(args.images, args.caps_per_image, args.dim, args.seed)
    img_cat = torch.cat([emb["img_g"], emb["img_l"]], dim=1)
    cap_cat = torch.cat([emb["cap_g"], emb["cap_l"]], dim=1)
    # warm-up on a small slice: kernels and thread pools, not part of any timing
    small = {k: v[: 5 * args.caps_per_image] for k, v in emb.items() if k.startswith("cap")}
    small.update({k: v[:5] for k, v in emb.items() if k.startswith("img")})
    score_embeddings(small, 1.0)
    bare_product(img_cat[:5], cap_cat[:25], k=5)

    rounds, results = [], None
    for i in range(args.rounds):
        print(f"round {i + 1}/{args.rounds} ...", file=sys.stderr, flush=True)
        holder = {}
        ours_mb, ours_s, memory_method = measure_peak_increase(
            lambda holder=holder: holder.update(r=score_embeddings(emb, 1.0)))
        bare_mb, bare_s, _ = measure_peak_increase(lambda: bare_product(img_cat, cap_cat))
        results = holder["r"]
        rounds.append({"ours_s": ours_s, "bare_s": bare_s, "ratio": ours_s / bare_s, "ours_peak_mb": ours_mb,
                       "bare_peak_mb": bare_mb})
    print("SCAN sample ...", file=sys.stderr, flush=True)
    return {"rounds": rounds, "recalls": {k: v for k, v in results.items() if k in ("global", "local", "concat")},
            "memory_method": memory_method, **time_scan(args)}


def report(args: argparse.Namespace, out: dict) -> None:
    rounds = out["rounds"]
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    captions = args.images * args.caps_per_image
    print(f"evaluation scoring, {args.images} images x {captions} captions, global + local {args.dim}-d each "
          f"(concat {2 * args.dim}-d), {args.threads} threads, chunk 256 images")
    print(f"{'round':>5} {'ours s':>8} {'bare s':>8} {'ours/bare':>10} {'ours MB':>9} {'bare MB':>9}")
    for i, r in enumerate(rounds):
        print(f"{i:>5} {r['ours_s']:>8.2f} {r['bare_s']:>8.2f} {r['ratio']:>10.3f} {r['ours_peak_mb']:>9.0f} "
              f"{r['bare_peak_mb']:>9.0f}")
    print(f"{'med':>5} {med['ours_s']:>8.2f} {med['bare_s']:>8.2f} {med['ratio']:>10.3f} {med['ours_peak_mb']:>9.0f} "
          f"{med['bare_peak_mb']:>9.0f}   goal <= 1.3: {'met' if med['ratio'] <= 1.3 else 'NOT met'}")
    print("ours = 3 scores (global, local, concat) x 2 directions, exact ranks; bare = 1 score, top-10 only; "
          f"one full score matrix = {4 * args.images * captions / MB:.0f} MB; memory by {out['memory_method']}")
    print(f"concat R@1 i2t {out['recalls']['concat']['i2t_r1']:.1f} t2i {out['recalls']['concat']['t2i_r1']:.1f} "
          f"(synthetic captions: noisy copies of their picture's vector)")
    ratio = out["scan_extrapolated_s"] / med["ours_s"]
    print(f"SCAN t2i cross-attention ({args.regions} regions x {args.words} words, {args.dim}-d): "
          f"{out['scan_pairs_per_s']:.0f} pairs/s over {out['scan_pairs_timed']} pairs -> "
          f"{out['scan_extrapolated_s'] / 3600:.1f} h for {out['total_pairs']:.3g} pairs, {ratio:.0f}x ours")
    print(json.dumps({"images": args.images, "captions": captions, "dim": args.dim, "threads": args.threads,
                      **{f"median_{k}": round(v, 3) for k, v in med.items()}, "goal_ratio": 1.3,
                      "goal_met": med["ratio"] <= 1.3, "full_matrix_mb": 4 * args.images * captions / MB,
                      "scan_over_ours": ratio, **out}))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--caps-per-image", type=int, default=5)
    parser.add_argument("--dim", type=int, default=1024, help="dimension of each space (concat is twice this)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--words", type=int, default=12)
    parser.add_argument("--scan-captions", type=int, default=8, help="captions per timed SCAN batch")
    parser.add_argument("--scan-images", type=int, default=64, help="pictures per timed SCAN batch")
    parser.add_argument("--scan-seconds", type=float, default=10.0, help="time the SCAN scorer about this long")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("images", "caps_per_image", "dim", "rounds", "threads", "regions", "words", "scan_captions",
                 "scan_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:
        # the setting must be in place before the process starts: run again with it
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
        os.execve(sys.executable, [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]], env)
    report(args, run(args))


if __name__ == "__main__":
    main()
