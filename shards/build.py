"""`hier-shards build`: turn a source of (image, captions) into a labelled shard set.

Order of work: generate the raw samples of every split, lemmatise all captions, build the concept and word
vocabularies from the train split only, then write the shards and the json files (manifest last).
A source is a pair of functions: the split sizes it will yield and the samples of one split, so other
`--source` kinds only add an entry to SOURCES (and their options to the parser).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from shards.builtin_corpus import MIN_IMAGE_SIZE, builtin_samples
from shards.concepts import (
    BLANK_PIPELINE, DEFAULT_PIPELINE, UNIVERSAL_POS, ConceptExtractor, build_concept_vocab, concept_ids, union_ids,
)
from shards.emoji_corpus import add_emoji_options, emoji_split, emoji_split_sizes
from shards.writer import PARTIAL_SUFFIX, RawSample, ShardSetWriter, write_concepts_json
from trainer.text import Vocab

TRAIN = "train"


def progress(total: int, desc: str) -> tqdm:
    """A live bar on a terminal; in a log file (CI, nohup) a line every 10 s instead of hundreds of updates."""
    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="img", mininterval=0.1 if interactive else 10.0)
SHARD_SET_FILES = ("manifest.json", "concepts.json", "vocab.json")
# options that say where and how to write, not what is built: kept out of the manifest
_NOT_BUILD_OPTIONS = ("command", "run", "out", "overwrite", "spacy_processes")


@dataclass(frozen=True)
class Source:
    """split_sizes: split name -> number of images it will yield, in build order; samples: one split's stream."""

    split_sizes: Callable[[argparse.Namespace], dict[str, int]]
    samples: Callable[[argparse.Namespace, str], Iterator[RawSample]]


def _builtin_sizes(args: argparse.Namespace) -> dict[str, int]:
    sizes = {"train": args.train_images, "val": args.val_images, "test": args.test_images}
    return {split: n for split, n in sizes.items() if n > 0}


def _builtin_split(args: argparse.Namespace, split: str) -> Iterator[RawSample]:
    return builtin_samples(split, _builtin_sizes(args)[split], args.seed, args.image_size)


SOURCES: dict[str, Source] = {
    "builtin": Source(_builtin_sizes, _builtin_split),
    "emoji": Source(emoji_split_sizes, emoji_split),
}


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


def _pos_list(text: str) -> list[str]:
    tags = [p.strip().upper() for p in text.split(",") if p.strip()]
    unknown = [t for t in tags if t not in UNIVERSAL_POS]
    if not tags or unknown:
        raise argparse.ArgumentTypeError(f"unknown POS tags {unknown}; use Universal POS tags such as NOUN,ADJ,VERB")
    return tags


def add_build_command(subparsers) -> None:
    p = subparsers.add_parser("build", help="build a shard set", description=__doc__,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", choices=sorted(SOURCES), required=True, help="where images and captions come from")
    p.add_argument("--out", required=True, help="output folder (must be empty unless --overwrite)")
    p.add_argument("--name", default="builtin", help="shard file prefix: NAME-SPLIT-000000.tar")
    p.add_argument("--shard-size", type=_int_at_least(1), default=500, help="samples per tar")
    p.add_argument("--max-concepts", type=_int_at_least(1), default=1000, help="concept vocabulary size K")
    p.add_argument("--min-concept-count", type=_int_at_least(1), default=5,
                   help="a concept must occur in at least this many training captions")
    p.add_argument("--pos", type=_pos_list, default=["NOUN"], help="comma-separated POS tags that make concepts")
    p.add_argument("--spacy-pipeline", default=DEFAULT_PIPELINE,
                   help=f"installed spaCy pipeline with a tagger, or {BLANK_PIPELINE!r}: lookup lemmas of every "
                        "non-stop word, no tagger, about 20x faster (--pos is then not used)")
    p.add_argument("--spacy-processes", type=_int_at_least(1), default=1,
                   help="processes for lemmatisation, the slowest step (same output for any number)")
    p.add_argument("--min-word-count", type=_int_at_least(1), default=1, help="word vocabulary threshold")
    p.add_argument("--overwrite", action="store_true", help="replace the shard set in an existing --out folder")
    builtin = p.add_argument_group("--source builtin")
    builtin.add_argument("--seed", type=_int_at_least(0), default=0)
    builtin.add_argument("--train-images", type=_int_at_least(1), default=8000)
    builtin.add_argument("--val-images", type=_int_at_least(0), default=500)
    builtin.add_argument("--test-images", type=_int_at_least(0), default=1000)
    builtin.add_argument("--image-size", type=_int_at_least(MIN_IMAGE_SIZE), default=64)
    add_emoji_options(p)
    p.set_defaults(run=run_build)


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty folder unless --overwrite; with it, remove only an earlier shard set's files."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise FileExistsError(f"output folder {out} exists and is not empty; pass --overwrite to replace it")
    ours = [f for f in out.iterdir() if f.is_file() and (
        f.name in SHARD_SET_FILES or f.name.endswith(".tar") or f.name.endswith(".tar" + PARTIAL_SUFFIX))]
    others = sorted(f.name for f in out.iterdir() if f not in ours)
    if others:
        raise FileExistsError(f"output folder {out} holds files that are not part of a shard set "
                              f"({', '.join(others[:5])}); not overwriting it")
    for f in ours:
        f.unlink()


def build(args: argparse.Namespace) -> dict:
    """Build the shard set described by the parsed options; returns a summary."""
    started = time.perf_counter()
    out = Path(args.out)
    prepare_out_dir(out, args.overwrite)
    source = SOURCES[args.source]
    # loading the pipeline first makes a missing one fail before minutes of generation
    extractor = ConceptExtractor(args.spacy_pipeline, tuple(args.pos), n_process=args.spacy_processes)
    phases = {"load": time.perf_counter() - started}

    sizes = source.split_sizes(args)
    if TRAIN not in sizes:
        raise ValueError(f"source {args.source!r} yields no {TRAIN!r} split; vocabularies are built from it")
    samples: dict[str, list[RawSample]] = {}
    with progress(sum(sizes.values()), "generating") as bar:
        for split in sizes:
            samples[split] = []
            for sample in source.samples(args, split):
                samples[split].append(sample)
                bar.update(1)

    phases["generate"] = time.perf_counter() - started - sum(phases.values())

    all_captions = [c for split in sizes for s in samples[split] for c in s.captions]
    all_lemmas = iter(extractor.lemmas(all_captions))
    lemmas = {split: [[next(all_lemmas) for _ in s.captions] for s in samples[split]] for split in sizes}

    train_lemmas = [caption for image in lemmas[TRAIN] for caption in image]
    concept_vocab = build_concept_vocab(train_lemmas, args.max_concepts, args.min_concept_count)
    lemma_to_id = {lemma: i for i, (lemma, _) in enumerate(concept_vocab)}
    word_vocab = Vocab.build((c for s in samples[TRAIN] for c in s.captions), min_count=args.min_word_count)
    phases["lemmas"] = time.perf_counter() - started - sum(phases.values())

    writer = ShardSetWriter(out, args.name, args.shard_size)
    with progress(sum(sizes.values()), "writing") as bar:
        for split in sizes:
            for sample, caption_lemmas in zip(samples[split], lemmas[split]):
                caption_concepts = [concept_ids(ls, lemma_to_id) for ls in caption_lemmas]
                writer.write(split, sample.image_id, sample.image_bytes, sample.image_ext, sample.captions,
                             caption_concepts, union_ids(caption_concepts), args.source)
                bar.update(1)
    write_concepts_json(out / "concepts.json", concept_vocab)
    word_vocab.to_json(out / "vocab.json")
    build_options = {k: v for k, v in vars(args).items() if k not in _NOT_BUILD_OPTIONS}
    manifest = writer.close({
        "source": args.source,
        "num_concepts": len(concept_vocab),
        "vocab_size": len(word_vocab),
        "spacy": extractor.describe(),
        "build": build_options,
    })
    seconds = time.perf_counter() - started
    phases["write"] = seconds - sum(phases.values())
    return {"out": str(out), "manifest": manifest, "seconds": seconds, "phases": phases}


def format_summary(summary: dict) -> str:
    manifest = summary["manifest"]
    phases = ", ".join(f"{name} {secs:.1f}" for name, secs in summary["phases"].items())
    lines = [f"built shard set {manifest['name']!r} in {summary['out']} ({summary['seconds']:.1f} s: {phases})"]
    for split, s in manifest["splits"].items():
        lines.append(f"  {split}: {s['images']} images, {s['captions']} captions, {len(s['shards'])} shards")
    lines.append(f"  concepts: {manifest['num_concepts']} (pos {','.join(manifest['spacy']['pos'])}), "
                 f"word vocabulary: {manifest['vocab_size']}")
    return "\n".join(lines)


def run_build(args: argparse.Namespace) -> int:
    print(format_summary(build(args)))
    return 0
