r"""`hier-shards build`: turn a source of (image, captions) into a labelled shard set.

    python -m shards build --source builtin --out data/builtin
    python -m shards build --source karpathy --karpathy-json dataset_flickr30k.json --images flickr30k-images \
        --out data/f30k --name f30k
    python -m shards build --source coco --annotations test=captions_val2014.json --images coco \
        --vocab-from data/coco-train --out data/coco-test --name coco-test

(each source module's docstring in shards/sources/ has its own command lines)

Order of work: read every item of the source once, checking ids, splits, captions and pictures
(shards/sources/checking.py: bad input is skipped and counted per kind in the manifest, or stops the build
with --on-error stop); lemmatise all kept captions; build the concept and word vocabularies from the train
split only (or take another set's with --vocab-from); then read the pictures again and write the shards
(planned from the item order alone, so --resume recognises the ones an interrupted build finished) and the
json files, manifest last.
A source is a `Source` (shards/sources/base.py): its argparse options and a stream of `Item`s; add one with
an entry in SOURCES. A source of in-memory `RawSample`s per split plugs in through `in_memory_source`.
"""
from __future__ import annotations

import argparse
import errno
import functools
import hashlib
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from shards.builtin_corpus import MIN_IMAGE_SIZE, builtin_samples
from shards.concepts import (
    BLANK_PIPELINE,
    DEFAULT_PIPELINE,
    UNIVERSAL_POS,
    ConceptExtractor,
    build_concept_vocab,
    concept_ids,
    union_ids,
)
from shards.emoji_corpus import add_emoji_options, emoji_split, emoji_split_sizes
from shards.format import FEATURE_EXT, SHARD_SET_FILES, shard_file_name
from shards.progress import progress
from shards.remote import SetRoot, access_error, is_url, read_bytes, redact_url, set_root
from shards.sources import coco, hf, karpathy, openmoji, scan_precomp, table, union, wds_relabel
from shards.sources.base import ON_ERROR, BadSample, InputError, Item, Problems, Source
from shards.sources.checking import PICTURE_CHUNK, checked_items
from shards.sources.pictures import checked_picture, needs_resize
from shards.store import StoreOutput
from shards.text import Vocab
from shards.writer import (
    PARTIAL_SUFFIX,
    RawSample,
    ShardSetWriter,
    sample_json,
    shard_contents,
    write_concepts_json,
    write_json,
)
from usercli import DefaultsHelpFormatter, OutputExists, UserError, os_error_message
from usercli.options import int_in

TRAIN = "train"


BUILD_RECORD = "build.partial.json"  # an unfinished build's options, so --resume can refuse different ones
# the options every build records in its manifest (each source adds its own group's options)
_COMMON_BUILD_OPTIONS = ("source", "name", "shard_size", "max_concepts", "min_concept_count", "pos",
                         "spacy_pipeline", "min_word_count", "on_error", "max_side", "vocab_from")


def in_memory_source(split_sizes: Callable[[argparse.Namespace], dict[str, int]],
                     samples: Callable[[argparse.Namespace, str], Iterator[RawSample]],
                     add_arguments: Callable[[argparse._ArgumentGroup], None]) -> Source:
    """A Source from generated samples: split sizes in build order and the RawSamples of one split."""
    def items(args: argparse.Namespace, problems: Problems) -> Iterator[Item]:
        for split in split_sizes(args):
            for sample in samples(args, split):
                yield Item(sample.image_id, split, list(sample.captions), where=f"{split} sample {sample.image_id}",
                           load=lambda data=sample.image_bytes: data, features=sample.image_ext == FEATURE_EXT,
                           objects=sample.objects)
    return Source(add_arguments, items)


def _builtin_sizes(args: argparse.Namespace) -> dict[str, int]:
    sizes = {"train": args.train_images, "val": args.val_images, "test": args.test_images}
    return {split: n for split, n in sizes.items() if n > 0}


def _builtin_split(args: argparse.Namespace, split: str) -> Iterator[RawSample]:
    return builtin_samples(split, _builtin_sizes(args)[split], args.seed, args.image_size)


def _builtin_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--seed", type=int_in(0), default=0,
                       help="seed of the generated scenes (sample k depends on seed, split and k only)")
    group.add_argument("--train-images", type=int_in(1), default=8000, help="pictures in the train split")
    group.add_argument("--val-images", type=int_in(0), default=500, help="pictures in the val split (0: no split)")
    group.add_argument("--test-images", type=int_in(0), default=1000, help="pictures in the test split (0: no split)")
    group.add_argument("--image-size", type=int_in(MIN_IMAGE_SIZE), default=64,
                       help="side of the square pictures in pixels")


SOURCES: dict[str, Source] = {
    "builtin": in_memory_source(_builtin_sizes, _builtin_split, _builtin_arguments),
    "karpathy": karpathy.SOURCE,
    "coco": coco.SOURCE,
    "csv": table.SOURCE,
    "hf": hf.SOURCE,
    "scan_precomp": scan_precomp.SOURCE,
    "wds_relabel": wds_relabel.SOURCE,
    "emoji": in_memory_source(emoji_split_sizes, emoji_split, add_emoji_options),
    "openmoji": openmoji.SOURCE,
}
SOURCES[union.NAME] = union.union_source(SOURCES)  # several of the above as one set, one vocabulary
# source name -> the dests of its own option group, filled by add_build_command (recorded in the manifest)
_SOURCE_OPTIONS: dict[str, tuple[str, ...]] = {}


def _recorded(args: argparse.Namespace) -> set[str]:
    """The source options that shape this set: its source's, and for a union each part's (checked here, before
    the build writes anything)."""
    names = [args.source] + (union.checked_parts(args, SOURCES) if args.source == union.NAME else [])
    return {option for name in names for option in _SOURCE_OPTIONS[name]}


def _pos_list(text: str) -> list[str]:
    tags = [p.strip().upper() for p in text.split(",") if p.strip()]
    unknown = [t for t in tags if t not in UNIVERSAL_POS]
    if not tags or unknown:
        raise argparse.ArgumentTypeError(f"unknown POS tags {unknown}; use Universal POS tags such as NOUN,ADJ,VERB")
    return tags


def add_build_command(subparsers) -> None:
    p = subparsers.add_parser("build", help="build a shard set", description=__doc__,
                              formatter_class=DefaultsHelpFormatter)
    p.add_argument("--source", choices=sorted(SOURCES), required=True, help="where images and captions come from")
    p.add_argument("--out", required=True,
                   help="output folder, or a store's URL: s3://bucket/prefix or any fsspec URL that can write "
                        "(each shard uploaded whole when finished, manifest.json last; credentials from the "
                        "environment); must be empty unless --overwrite or --resume")
    p.add_argument("--name", default="builtin", help="shard file prefix: NAME-SPLIT-000000.tar")
    p.add_argument("--shard-size", type=int_in(1), default=500, help="samples per tar (at most)")
    p.add_argument("--max-concepts", type=int_in(1), default=1000, help="concept vocabulary size K")
    p.add_argument("--min-concept-count", type=int_in(1), default=5,
                   help="a concept must occur in at least this many training captions")
    p.add_argument("--pos", type=_pos_list, default=["NOUN"], help="comma-separated POS tags that make concepts")
    p.add_argument("--spacy-pipeline", default=DEFAULT_PIPELINE,
                   help=f"installed spaCy pipeline with a tagger, or {BLANK_PIPELINE!r}: lookup lemmas of every "
                        "non-stop word, no tagger, about 20x faster (--pos is then not used)")
    p.add_argument("--spacy-processes", type=int_in(1), default=1,
                   help="processes for lemmatisation, the slowest step (same output for any number)")
    p.add_argument("--min-word-count", type=int_in(1), default=1, help="word vocabulary threshold")
    p.add_argument("--picture-threads", type=int_in(1), default=4,
                   help="threads that decode pictures to check them and resize them (same output for any number)")
    p.add_argument("--overwrite", action="store_true", help="replace the shard set in an existing --out folder")
    p.add_argument("--resume", action="store_true",
                   help="finish an interrupted build in --out (same options): finished shards that hold exactly "
                        "their expected samples are kept, the rest written")
    p.add_argument("--on-error", choices=ON_ERROR, default="skip",
                   help="bad input (missing/corrupt picture, empty or non-UTF-8 caption, duplicate id, unknown "
                        "split): skip it and count it in the manifest, or stop with an error naming it")
    p.add_argument("--max-side", type=int_in(MIN_IMAGE_SIZE), default=None,
                   help="re-encode pictures whose longer side exceeds this (others keep their bytes)")
    p.add_argument("--vocab-from", metavar="DIR|URL", default=None,
                   help="use the concept and word vocabularies of this shard set (a folder, or a set at a URL as "
                        "data.shards takes it) instead of building them")
    shared = p.add_argument_group("shared by --source karpathy, coco, csv, hf")
    shared.add_argument("--images", metavar="DIR", help="folder the source's image paths are relative to")
    for name, source in SOURCES.items():
        group = p.add_argument_group(f"--source {name}")
        source.add_arguments(group)
        # argparse keeps a group's actions in a private list; reading it keeps each source's options in one place
        _SOURCE_OPTIONS[name] = tuple(a.dest for a in group._group_actions) + source.shared_options
    p.set_defaults(run=run_build)


def _ours_name(name: str) -> bool:
    return (name in SHARD_SET_FILES or name == BUILD_RECORD or name.endswith(".tar")
            or name.endswith(".tar" + PARTIAL_SUFFIX))


def _ours(f: Path) -> bool:
    return f.is_file() and _ours_name(f.name)


def _check_taken(out: str, files: list[str], others: list[str], overwrite: bool, resume: bool) -> None:
    """Refuse a non-empty --out (its file names and the names of what else is in it) unless --overwrite or
    --resume, and refuse those where they cannot apply."""
    if not (overwrite or resume):
        raise OutputExists(f"output folder {out} exists and is not empty; pass --overwrite to replace it "
                              "(or --resume to finish an interrupted build)")
    if others:
        raise OutputExists(f"output folder {out} holds files that are not part of a shard set "
                              f"({', '.join(others[:5])}); not {'resuming in' if resume else 'overwriting'} it")
    if resume:
        if "manifest.json" in files:
            raise OutputExists(f"{out} holds a complete shard set (manifest.json); nothing to resume")
        if any(name.endswith(".tar") for name in files) and BUILD_RECORD not in files:
            raise OutputExists(f"{out} has shards but no {BUILD_RECORD}: not a build this version can resume")


def prepare_out_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse a non-empty folder unless --overwrite (which removes only an earlier shard set's files) or
    --resume (which keeps an unfinished build's complete shards)."""
    if out.exists() and not out.is_dir():
        raise OutputExists(f"--out {out} exists and is not a folder")
    if not out.is_dir() or not any(out.iterdir()):
        return
    _check_taken(str(out), [f.name for f in out.iterdir() if f.is_file()],
                 sorted(f.name for f in out.iterdir() if not _ours(f)), overwrite, resume)
    if not resume:
        for f in out.iterdir():
            f.unlink()


def prepare_store(store: StoreOutput, overwrite: bool, resume: bool) -> None:
    """prepare_out_dir for a store's URL: the same refusals; --overwrite deletes the earlier set's files there."""
    files = store.names()
    others = sorted(store.folders() + [name for name in files if not _ours_name(name)])
    if files or others:
        _check_taken(store.where(), files, others, overwrite, resume)
        if not resume:
            for name in files:
                store.remove(name)


def _start_record(out: Path, options: dict, resume: bool, store: StoreOutput | None = None) -> None:
    """Write the options of this build, or check them against those of the build being resumed (in the store,
    for a build to a URL: the record is uploaded before anything else, which shows a store that cannot be
    written before the source is read)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / BUILD_RECORD
    if store is not None:
        if resume:
            store.fetch(BUILD_RECORD, path)
        _check_record(path, options, resume)
        store.put(path, keep=True)
        return
    _check_record(path, options, resume)


def _check_record(path: Path, options: dict, resume: bool) -> None:
    if resume and path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(before) | set(options) if before.get(k) != options.get(k))
        if changed:
            raise InputError(f"--resume: options {changed} differ from the interrupted build's ({path}); "
                             "resume with the same options, or use --overwrite to start again")
    write_json(path, options)


@functools.lru_cache(maxsize=1)
def _extractor(pipeline: str, pos: tuple[str, ...], n_process: int) -> ConceptExtractor:
    """The loaded spaCy pipeline, kept for the next build in the same process (loading takes seconds)."""
    return ConceptExtractor(pipeline, pos, n_process=n_process)


class Reference(NamedTuple):
    """--vocab-from: the other set (a folder or a URL), its manifest, concepts, words and the two files' bytes."""

    root: Path | SetRoot
    manifest: dict
    concepts: list[tuple[str, int]]
    words: Vocab
    files: dict[str, bytes]


def _reference_vocab(args: argparse.Namespace) -> Reference:
    """--vocab-from: the other set's manifest and vocabularies, read once (locally or at its URL) and checked
    against this build."""
    ref = set_root(args.vocab_from)
    try:
        manifest = json.loads(read_bytes(ref / "manifest.json").decode("utf-8"))
        files = {name: read_bytes(ref / name) for name in ("concepts.json", "vocab.json")}
        concepts = json.loads(files["concepts.json"].decode("utf-8"))["concepts"]
        words = Vocab(json.loads(files["vocab.json"].decode("utf-8"))["words"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"--vocab-from {redact_url(ref)} is not a complete shard set (manifest.json, concepts.json, "
                         f"vocab.json): {redact_url(e, ref)}") from None
    except Exception as e:  # noqa: BLE001 - an fsspec protocol's own error (aiohttp, botocore): one line, no secret
        if not is_url(ref):
            raise
        raise InputError(f"--vocab-from: {access_error(ref, e)}") from None
    spacy = manifest.get("spacy", {})
    pos = [] if args.spacy_pipeline == BLANK_PIPELINE else args.pos  # the blank pipeline tags no part of speech
    if spacy.get("pipeline") != args.spacy_pipeline or spacy.get("pos") != pos:
        same = (f"--spacy-pipeline {spacy.get('pipeline')}" if not spacy.get("pos")
                else f"--pos {','.join(spacy['pos'])} --spacy-pipeline {spacy.get('pipeline')}")
        raise InputError(f"--vocab-from {redact_url(ref)} labelled {spacy.get('pos') or 'all'} lemmas of "
                         f"{spacy.get('pipeline')!r}; pass {same} so concept ids mean the same in both sets")
    if [c["id"] for c in concepts] != list(range(len(concepts))):
        raise InputError(f"{redact_url(ref / 'concepts.json')}: concept ids are not 0..{len(concepts) - 1} in order")
    return Reference(ref, manifest, [(c["lemma"], c["count"]) for c in concepts], words, files)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sample_bytes(item: Item, max_side: int | None) -> tuple[bytes, str, bool]:
    """(bytes, extension, resized) for writing; the item was checked before, so a failure now is fatal."""
    try:
        data = item.load()
        if item.features:
            return data, FEATURE_EXT, False
        return checked_picture(data, max_side, verify=False)  # verified in the checking pass
    except BadSample as e:
        raise InputError(f"{item.where}: image {item.image_id} changed during the build: {e}") from None


def plan_shards(split_items: list[Item], shard_size: int) -> list[list[int]]:
    """Item positions per shard: at most shard_size each, a new shard where the input's shard (group) changes.
    The same items always give the same plan, which is what lets a resumed build recognise finished shards."""
    shards: list[list[int]] = []
    current: list[int] = []
    for k, item in enumerate(split_items):
        if current and (len(current) == shard_size or item.group != split_items[current[-1]].group):
            shards.append(current)
            current = []
        current.append(k)
    if current:
        shards.append(current)
    return shards


def _finished_shard(path: Path, expected: list[tuple[str, bytes]]) -> list[str] | None:
    """The picture extensions of a complete shard on disk holding exactly the expected (id, json) samples."""
    found = shard_contents(path) if path.is_file() else None
    if found is None or [(image_id, meta) for image_id, _, meta in found] != expected:
        return None
    return [ext for _, ext, _ in found]


def _kept_shard(path: Path, expected: list[tuple[str, bytes]], store: StoreOutput | None,
                in_store: set[str]) -> list[str] | None:
    """_finished_shard for a resumed build; at a URL the store's copy is fetched into staging first (the writer
    adopts it from there, and it is removed after)."""
    if store is not None and (path.name not in in_store or not store.fetch(path.name, path)):
        return None
    return _finished_shard(path, expected)


def _write_shards(writer: ShardSetWriter, labelled: dict[str, list[tuple[Item, list[list[int]]]]],
                  args: argparse.Namespace, pool: ThreadPoolExecutor,
                  store: StoreOutput | None = None) -> tuple[int, dict[str, int]]:
    """Write every split shard by shard; with --resume, keep each finished shard that holds exactly the
    samples it should. Pictures are read (and resized) by the pool's threads, written in order. At a URL, each
    shard goes into the store when finished (and leaves staging).
    Returns the number of resized pictures and {kept, written} shard counts."""
    resized = 0
    resumed = {"kept": 0, "written": 0}
    in_store = set(store.names()) if store is not None and args.resume else set()
    with progress(sum(len(v) for v in labelled.values()), "writing") as bar:
        for split, samples in labelled.items():
            for index, positions in enumerate(plan_shards([item for item, _ in samples], args.shard_size)):
                shard = [samples[k] for k in positions]
                metas = [sample_json(split, item.image_id, item.captions, concepts, union_ids(concepts), args.source,
                                     item.objects)
                         for item, concepts in shard]
                path = writer.out_dir / shard_file_name(writer.name, split, index)
                exts = _kept_shard(path, [(item.image_id, m) for (item, _), m in zip(shard, metas)], store,
                                   in_store) if args.resume else None
                if exts is not None:
                    writer.adopt_shard(split, [(item.image_id, ext, len(item.captions))
                                               for (item, _), ext in zip(shard, exts)])
                    if store is not None:
                        path.unlink()
                    if args.max_side is not None:  # count as a fresh build would
                        resized += sum(not item.features and needs_resize(item.load(), args.max_side)
                                       for item, _ in shard)
                    resumed["kept"] += 1
                    bar.update(len(shard))
                    continue
                for start in range(0, len(shard), PICTURE_CHUNK):
                    part = shard[start:start + PICTURE_CHUNK]
                    loaded = pool.map(lambda sample: _sample_bytes(sample[0], args.max_side), part)
                    for (item, concepts), (data, ext, was_resized) in zip(part, loaded):
                        resized += was_resized
                        writer.write(split, RawSample(item.image_id, data, ext, item.captions, item.objects),
                                     concepts, union_ids(concepts), args.source)
                        bar.update(1)
                writer.end_shard(split)
                if store is not None:
                    store.put(path)
                resumed["written"] += 1
    return resized, resumed


def _vocabularies(items: dict[str, list[Item]], lemmas: dict[str, list[list[list[str]]]], args: argparse.Namespace,
                  reference: Reference | None) -> tuple[list[tuple[str, int]], Vocab]:
    """The concept and word vocabularies: from the train split only, or the --vocab-from set's."""
    if reference is not None:
        return reference.concepts, reference.words
    train_lemmas = [caption for image in lemmas[TRAIN] for caption in image]
    concept_vocab = build_concept_vocab(train_lemmas, args.max_concepts, args.min_concept_count)
    word_vocab = Vocab.build((c for item in items[TRAIN] for c in item.captions), min_count=args.min_word_count)
    return concept_vocab, word_vocab


def _write_vocab_files(out: Path, concept_vocab: list[tuple[str, int]], word_vocab: Vocab,
                       reference: Reference | None) -> dict | None:
    """concepts.json and vocab.json; with --vocab-from, byte copies (both sets provably share one vocabulary)
    and the manifest's record of where they came from."""
    if reference is None:
        write_concepts_json(out / "concepts.json", concept_vocab)
        word_vocab.to_json(out / "vocab.json")
        return None
    for name, data in reference.files.items():
        (out / name).write_bytes(data)
    return {"path": redact_url(reference.root), "name": reference.manifest.get("name"),
            "concepts_sha256": _file_sha256(out / "concepts.json"), "vocab_sha256": _file_sha256(out / "vocab.json")}


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a write past the space left: the build can resume


def build(args: argparse.Namespace) -> dict:
    """Build the shard set described by the parsed options; returns a summary."""
    if is_url(args.out):
        return _build_to_store(args)
    out = Path(args.out)
    fresh = not out.exists()
    try:
        # PIL releases the GIL while it decodes and encodes, so threads check and resize pictures in parallel
        with ThreadPoolExecutor(args.picture_threads) as pool:
            return _build(args, pool)
    except (UserError, OSError) as e:  # a refusal (InputError, PipelineError, ...) or an unusable input path
        if not args.resume:
            _forget_unstarted_build(out, fresh)
        if isinstance(e, OSError) and e.errno in DISK_FULL and e.filename is None:
            hint = os_error_message(e).split(": ", 1)[1].split(";")[0]
            raise UserError(f"--out {out}: writing failed: {hint}; free space, then finish the build with --resume "
                            f"(same options; finished shards are kept), or write elsewhere") from e
        raise


def _build_to_store(args: argparse.Namespace) -> dict:
    """A build to a URL: written in a local staging folder (removed at the end), each finished file moved into the
    store (shards.store)."""
    store = StoreOutput(args.out)
    with tempfile.TemporaryDirectory(prefix="shards-build-") as staging:
        try:
            with ThreadPoolExecutor(args.picture_threads) as pool:
                return _build(args, pool, Path(staging), store)
        except (UserError, OSError):  # as _forget_unstarted_build: a refused build leaves no record behind
            if not args.resume:
                try:
                    if not any(name.endswith(".tar") for name in store.names()):
                        store.remove(BUILD_RECORD)
                except UserError:
                    pass  # the store cannot be reached: the first error is the one to report
            raise


def _forget_unstarted_build(out: Path, fresh: bool) -> None:
    """A build refused before it wrote any shard leaves nothing behind: its record (which would make the folder
    look resumable) and the folder itself when this build made it. Written shards stay, for --resume."""
    if not out.is_dir() or any(out.glob("*.tar")) or any(out.glob(f"*{PARTIAL_SUFFIX}")):
        return
    (out / BUILD_RECORD).unlink(missing_ok=True)
    if fresh and not any(out.iterdir()):
        out.rmdir()


def _close_set(writer: ShardSetWriter, store: StoreOutput | None, fields: dict) -> dict:
    """The manifest written last (after concepts.json and vocab.json, in the store too), then the build's record
    removed; returns the manifest."""
    out = writer.out_dir
    if store is not None:
        store.put(out / "concepts.json")
        store.put(out / "vocab.json")
    manifest = writer.close(fields)
    if store is not None:
        store.put(out / "manifest.json")
        store.remove(BUILD_RECORD)
    (out / BUILD_RECORD).unlink()
    return manifest


def _build(args: argparse.Namespace, pool: ThreadPoolExecutor, staging: Path | None = None,
           store: StoreOutput | None = None) -> dict:
    """The build; to a URL (store), written in `staging` and moved into the store file by file."""
    started = time.perf_counter()
    out = Path(args.out) if store is None else staging
    if args.resume and args.overwrite:
        raise InputError("--resume keeps an interrupted build's shards, --overwrite removes them: pass one")
    # The pipeline (and spaCy, seconds to import) first, before the build writes anything: a missing one fails
    # before minutes of reading. A Ctrl-C that landed while spaCy was imported in the middle of a build sometimes
    # ended the process by SIGINT after the one-line message, instead of exit 130 (2 of 36 probes; 0 of 36 with
    # the import here, before the build's record and its threads).
    extractor = _extractor(args.spacy_pipeline, tuple(args.pos), args.spacy_processes)
    if store is None:
        prepare_out_dir(out, args.overwrite, args.resume)
    else:
        prepare_store(store, args.overwrite, args.resume)
    build_options = {k: v for k, v in vars(args).items() if k in _COMMON_BUILD_OPTIONS or k in _recorded(args)}
    _start_record(out, build_options, args.resume, store)
    source = SOURCES[args.source]
    reference = _reference_vocab(args) if args.vocab_from else None
    problems = Problems(args.on_error)
    phases = {"load": time.perf_counter() - started}

    with progress(None, "checking") as bar:
        items = checked_items(source.items(args, problems), problems, pool, bar)
    if TRAIN not in items and reference is None:
        raise InputError(f"source {args.source!r} yielded no usable {TRAIN!r} images; the vocabularies are built "
                         f"from them (or pass --vocab-from another shard set)"
                         + (f"; skipped: {problems.counts}" if problems.counts else ""))
    phases["check"] = time.perf_counter() - started - sum(phases.values())

    all_captions = [c for split in items for item in items[split] for c in item.captions]
    all_lemmas = iter(extractor.lemmas(all_captions))
    lemmas = {split: [[next(all_lemmas) for _ in item.captions] for item in items[split]] for split in items}
    concept_vocab, word_vocab = _vocabularies(items, lemmas, args, reference)
    lemma_to_id = {lemma: i for i, (lemma, _) in enumerate(concept_vocab)}
    phases["lemmas"] = time.perf_counter() - started - sum(phases.values())

    writer = ShardSetWriter(out, args.name, args.shard_size)
    labelled = {split: [(item, [concept_ids(ls, lemma_to_id) for ls in caption_lemmas])
                        for item, caption_lemmas in zip(items[split], lemmas[split])] for split in items}
    resized, resumed = _write_shards(writer, labelled, args, pool, store)
    vocab_from = _write_vocab_files(out, concept_vocab, word_vocab, reference)
    manifest = _close_set(writer, store, {
        "source": args.source,
        "num_concepts": len(concept_vocab),
        "vocab_size": len(word_vocab),
        "spacy": extractor.describe(),
        "build": build_options,
        "skipped": problems.manifest(),
        "resized_pictures": resized,
        "vocab_from": vocab_from,
    })
    seconds = time.perf_counter() - started
    phases["write"] = seconds - sum(phases.values())
    return {"out": str(out) if store is None else store.where(), "manifest": manifest, "seconds": seconds,
            "phases": phases, "resumed": resumed}


def format_summary(summary: dict) -> str:
    manifest = summary["manifest"]
    phases = ", ".join(f"{name} {secs:.1f}" for name, secs in summary["phases"].items())
    lines = [f"built shard set {manifest['name']!r} in {summary['out']} ({summary['seconds']:.1f} s: {phases})"]
    if summary["resumed"]["kept"]:
        lines.append(f"  resumed: kept {summary['resumed']['kept']} finished shards, "
                     f"wrote {summary['resumed']['written']}")
    for split, s in manifest["splits"].items():
        lines.append(f"  {split}: {s['images']} images, {s['captions']} captions, {len(s['shards'])} shards")
    for kind, skipped in manifest["skipped"].items():
        lines.append(f"  skipped {kind}: {skipped['count']} (first: {skipped['examples'][0]})")
    spacy = manifest["spacy"]
    how = f"pos {','.join(spacy['pos'])}" if spacy.get("pos") else "lookup lemmas, no tagger"
    lines.append(f"  concepts: {manifest['num_concepts']} ({how}), "
                 f"word vocabulary: {manifest['vocab_size']}")
    return "\n".join(lines)


def run_build(args: argparse.Namespace) -> int:
    # bad input (InputError, OutputExists: UserErrors) ends as one line in usercli.cli_main
    summary = build(args)
    print(format_summary(summary))
    return 0
