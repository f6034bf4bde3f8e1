"""`hier-shards stats DIR|URL`: what a shard set holds, from its shards' json members.

    python -m shards stats data/emoji [--top 20] [--json]
    python -m shards stats https://host/corpus/v1        (any URL data.shards takes: read through shards.remote)

Per split: bytes (and per shard), images, captions, the distribution of captions per image, words per caption
(the trainer's tokenizer), concepts per caption and per image, and the most frequent concepts (by number of
captions). Pictures are not decoded (`hier-shards check` does that).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tarfile
from collections import Counter
from pathlib import Path

from shards.check import SetFiles, ShardSetError, read_set_json, tar_samples
from shards.remote import SetRoot, access_detail, file_size, is_url, set_root
from shards.text import tokenize
from usercli.options import int_in


def _summary(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "mean": 0.0, "median": 0.0, "max": 0}
    return {"min": min(values), "mean": round(statistics.fmean(values), 3),
            "median": statistics.median(values), "max": max(values)}


def _samples(path: Path | SetRoot, root: Path | SetRoot):
    """tar_samples of one shard; a tar that cannot be read (empty, compressed, cut off, at a URL unreachable
    after its retries) is one line naming it."""
    try:
        yield from tar_samples(path)
    except (tarfile.TarError, EOFError) as e:
        raise ShardSetError(f"{path}: unreadable tar: {e}; run `hier-shards check {root}`") from e
    except OSError as e:
        if not is_url(path):
            raise
        raise ShardSetError(f"{path}: unreadable: {access_detail(path, e.__cause__ or e)}") from e


def _size(path: Path | SetRoot) -> int:
    try:
        return file_size(path)
    except FileNotFoundError as e:
        raise ShardSetError(f"{path}: listed in manifest.json but missing; run `hier-shards check`") from e
    except OSError as e:
        if not is_url(path):
            raise
        raise ShardSetError(f"{path}: unreadable: {access_detail(path, e.__cause__ or e)}") from e


def split_stats(root: Path | SetRoot, shards: list[str], lemmas: list[str], top: int) -> dict:
    shard_bytes: dict[str, int] = {}
    captions_per_image: Counter[int] = Counter()
    words: list[int] = []
    concepts_per_caption: list[int] = []
    concepts_per_image: list[int] = []
    concept_captions: Counter[int] = Counter()
    images = 0
    for shard in shards:
        path = root / shard
        shard_bytes[shard] = _size(path)
        for key, members in _samples(path, root):
            raw = dict(members).get("json")
            if raw is None:
                raise ShardSetError(f"{path}: sample {key!r} has no json member; run `hier-shards check {root}`")
            try:
                meta = json.loads(raw)
                captions, caption_concepts = meta["captions"], meta["caption_concepts"]
                image_concepts = meta["image_concepts"]
                if not all(isinstance(v, list) for v in (captions, caption_concepts, image_concepts)):
                    raise TypeError("captions, caption_concepts and image_concepts must be lists")
            except (ValueError, KeyError, TypeError) as e:
                raise ShardSetError(
                    f"{path}: sample {key!r}: unusable json ({e}); run `hier-shards check {root}`") from e
            images += 1
            captions_per_image[len(captions)] += 1
            words += [len(tokenize(c)) for c in captions]
            concepts_per_caption += [len(ids) for ids in caption_concepts]
            concepts_per_image.append(len(image_concepts))
            for ids in caption_concepts:
                concept_captions.update(ids)
    n_captions = sum(n * k for n, k in captions_per_image.items())
    return {
        "bytes": sum(shard_bytes.values()),
        "shard_bytes": shard_bytes,
        "images": images,
        "captions": n_captions,
        "captions_per_image": {str(n): k for n, k in sorted(captions_per_image.items())},
        "words_per_caption": _summary(words),
        "concepts_per_caption": {**_summary(concepts_per_caption),
                                 "none": sum(1 for n in concepts_per_caption if n == 0)},
        "concepts_per_image": _summary(concepts_per_image),
        "concepts_used": len(concept_captions),
        "top_concepts": [{"lemma": lemmas[i], "captions": n}
                         for i, n in sorted(concept_captions.items(), key=lambda item: (-item[1], item[0]))[:top]],
    }


def shard_set_stats(root: str | Path, top: int = 20) -> dict:
    files = SetFiles.open(set_root(root))
    entries = read_set_json(files.root / "concepts.json")["concepts"]
    lemmas = [e["lemma"] for e in entries]
    splits = {split: split_stats(files.root, info["shards"], lemmas, top)
              for split, info in files.manifest["splits"].items()}
    return {
        "root": str(files.root),
        "bytes": sum(s["bytes"] for s in splits.values()),
        "num_concepts": files.num_concepts,
        "vocab_size": files.vocab_size,
        "labels": files.manifest.get("spacy", {}),
        "splits": splits,
    }


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_stats(stats: dict) -> str:
    labels = stats["labels"]
    how = ("tagger " + ",".join(labels.get("pos", [])) if labels.get("tagger", True)
           else f"{labels.get('lemmatizer')} lemmatizer, no tagger")
    lines = [f"{stats['root']}: {_human(stats['bytes'])}, {stats['num_concepts']} concepts "
             f"({labels.get('pipeline')}, {how}), {stats['vocab_size']} words"]
    for split, s in stats["splits"].items():
        w, cc, ci = s["words_per_caption"], s["concepts_per_caption"], s["concepts_per_image"]
        per_shard = ", ".join(f"{name} {_human(n)}" for name, n in s["shard_bytes"].items())
        lines += [
            f"{split}: {s['images']} images, {s['captions']} captions, {_human(s['bytes'])} "
            f"in {len(s['shard_bytes'])} shards ({per_shard})",
            "  captions per image: " + ", ".join(f"{n}: {k}" for n, k in s["captions_per_image"].items()),
            f"  words per caption: min {w['min']}, mean {w['mean']:.2f}, median {w['median']}, max {w['max']}",
            f"  concepts per caption: mean {cc['mean']:.2f}, max {cc['max']}, none {cc['none']} captions; "
            f"per image: mean {ci['mean']:.2f}; {s['concepts_used']} distinct concepts",
            "  most frequent: " + ", ".join(f"{c['lemma']} {c['captions']}" for c in s["top_concepts"]),
        ]
    return "\n".join(lines)


def run_stats(args: argparse.Namespace) -> int:
    stats = shard_set_stats(args.dir, args.top)
    print(json.dumps(stats, indent=1) if args.json else format_stats(stats))
    return 0


def add_stats_command(subparsers) -> None:
    p = subparsers.add_parser("stats", help="sizes, counts and label statistics of a shard set",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="shard-set folder (with manifest.json), or its URL (s3://, http(s)://, ...)")
    p.add_argument("--top", type=int_in(1), default=20, help="how many of the most frequent concepts to list")
    p.add_argument("--json", action="store_true", help="print one json object instead of text")
    p.set_defaults(run=run_stats)
