"""`hier-shards check DIR|URL`: read a whole shard set back and hold it to its format (docs/design.md section 3).

    python -m shards check data/emoji
    python -m shards check s3://bucket/corpus/v1        (any URL data.shards takes: read through shards.remote)

Opens every shard of every split named in manifest.json, decodes every sample (pictures with PIL, region
features with np.load(allow_pickle=False)), checks the members and json fields of each sample, the concept ids
against concepts.json, and the image, caption and shard counts against the manifest. Prints the counts; on any
problem prints each one, naming the file and the sample, and exits with status 1.
"""
from __future__ import annotations

import argparse
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from shards.format import FEATURE_EXT, FORMAT, PICTURE_EXTS, SAMPLE_FIELDS, SHARD_SET_FILES, first_link_out
from shards.remote import (
    SetRoot,
    access_detail,
    file_size,
    is_url,
    list_names,
    not_a_plain_tar,
    open_shard,
    read_text,
    redact_url,
    set_root,
)
from shards.sources.pictures import error_reason
from shards.text import Vocab
from usercli import UserError

MAX_SHOWN = 50  # problems printed; the count says how many there were in all

Image.MAX_IMAGE_PIXELS = 64_000_000  # as the trainer: a decompression bomb is a problem, not a picture


class ShardSetError(UserError, ValueError):
    """The shard set's json files cannot be read; nothing else can be checked."""

    def __init__(self, message: object = "", *args: object):
        super().__init__(redact_url(message), *args)  # a URL's password is never shown (shards.remote.redact_url)


def tar_samples(path: Path | SetRoot) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """(key, [(extension, bytes), ...]) per sample, grouped as WebDataset groups them: consecutive members with
    the same name up to the first dot. Raises tarfile.TarError for a broken tar, an empty or a compressed one; a
    shard at a URL is read sequentially through shards.remote (OSError once its retries are spent)."""
    why = not_a_plain_tar(path)
    if why is not None:
        raise tarfile.ReadError(why)
    key: str | None = None
    members: list[tuple[str, bytes]] = []
    # plain only ("r:"): "r" would decompress what the trainer cannot read
    with open_shard(path) as f, tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            if not info.isfile():
                continue
            name = info.name.rsplit("/", 1)[-1]
            stem, _, ext = name.partition(".")
            if stem != key:
                if key is not None:
                    yield key, members
                key, members = stem, []
            members.append((ext, tar.extractfile(info).read()))
        if key is not None:
            yield key, members


def read_set_json(path: Path | SetRoot):
    """A JSON file of a shard set (manifest, concepts, vocab), local or at a URL; an unreadable one is a
    ShardSetError naming it (at a URL: why, and for S3 the credential source tried). Not
    shards.sources.base.read_json_file, which reads a user's input file given by an option."""
    try:
        return json.loads(read_text(path) if is_url(path) else path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ShardSetError(f"cannot read {path}: {e}") from e
    except OSError as e:  # at a URL: ShardUnreachableError after its retries, or the library's own error
        raise ShardSetError(f"cannot read {path}: "
                            f"{access_detail(path, e.__cause__ or e) if is_url(path) else e}") from e


@dataclass
class SetFiles:
    """manifest.json, concepts.json and vocab.json of a shard set, each checked on its own."""

    root: Path | SetRoot
    manifest: dict
    num_concepts: int
    vocab_size: int

    @classmethod
    def open(cls, root: Path | SetRoot) -> "SetFiles":
        refuse_links_out(root, SHARD_SET_FILES)
        manifest = read_set_json(root / "manifest.json")
        where = root / "manifest.json"
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ShardSetError(f"{where}: not a {FORMAT} manifest (format is {manifest.get('format')!r})"
                                if isinstance(manifest, dict) else f"{where}: not a json object")
        splits = manifest.get("splits")
        if not isinstance(splits, dict) or not splits:
            raise ShardSetError(f"{where}: 'splits' must be a non-empty object")
        for split, info in splits.items():
            if not (isinstance(info, dict) and isinstance(info.get("images"), int)
                    and isinstance(info.get("captions"), int) and isinstance(info.get("shards"), list)):
                raise ShardSetError(f"{where}: split {split!r} needs 'images', 'captions' (ints) and 'shards' (list)")
        concepts_path = root / "concepts.json"
        entries = read_set_json(concepts_path)
        try:
            ids = [int(e["id"]) for e in entries["concepts"]]
            lemmas = [e["lemma"] for e in entries["concepts"]]
        except (TypeError, KeyError, ValueError) as e:
            raise ShardSetError(f"{concepts_path}: each concept needs an 'id' and a 'lemma' ({e})") from e
        if ids != list(range(len(ids))) or len(set(lemmas)) != len(lemmas):
            raise ShardSetError(f"{concepts_path}: concept ids must be 0..K-1 in order, lemmas unique")
        if manifest.get("num_concepts") != len(ids):
            raise ShardSetError(f"{where}: num_concepts {manifest.get('num_concepts')} but {concepts_path} "
                                f"has {len(ids)} concepts")
        words = read_set_json(root / "vocab.json")
        try:
            vocab = Vocab(words["words"])
        except (KeyError, TypeError, ValueError) as e:
            raise ShardSetError(f"cannot read word vocabulary {root / 'vocab.json'}: {e}") from e
        if manifest.get("vocab_size") != len(vocab):
            raise ShardSetError(f"{where}: vocab_size {manifest.get('vocab_size')} but {root / 'vocab.json'} "
                                f"has {len(vocab)} words")
        refuse_links_out(root, [shard for info in splits.values() for shard in info["shards"]])
        return cls(root, manifest, len(ids), len(vocab))


def refuse_links_out(root: Path | SetRoot, names) -> None:
    """A file of a local set that is a symlink out of it is refused, naming it (shards.format.link_out_of_set)."""
    why = None if is_url(root) else first_link_out(root, names)
    if why is not None:
        raise ShardSetError(why)


@dataclass
class SplitCount:
    images: int = 0
    captions: int = 0
    shards: int = 0


@dataclass
class CheckResult:
    counts: dict[str, SplitCount] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def _bad_ids(ids, num_concepts: int) -> bool:
    return (not isinstance(ids, list) or any(not isinstance(i, int) or isinstance(i, bool) for i in ids)
            or ids != sorted(set(ids)) or any(i < 0 or i >= num_concepts for i in ids))


def check_record(meta, key: str, split: str, source: str | None, num_concepts: int) -> list[str]:
    """What is wrong with one sample's json (empty when nothing)."""
    if not isinstance(meta, dict):
        return ["json is not an object"]
    missing = [f for f in SAMPLE_FIELDS if f not in meta]
    if missing:
        return [f"json lacks {missing}"]
    out = []
    if meta["image_id"] != key:
        out.append(f"image_id {meta['image_id']!r} differs from the tar key")
    captions = meta["captions"]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) and c.strip() for c in captions):
        out.append("captions must be a non-empty list of non-blank strings")
    caption_concepts = meta["caption_concepts"]
    if not isinstance(caption_concepts, list) or len(caption_concepts) != (len(captions) if isinstance(captions, list)
                                                                           else 0):
        out.append("caption_concepts must have one list per caption")
    else:
        for k, ids in enumerate(caption_concepts):
            if _bad_ids(ids, num_concepts):
                out.append(f"caption_concepts[{k}] = {ids}: not sorted unique ids in [0, {num_concepts})")
    image_concepts = meta["image_concepts"]
    if _bad_ids(image_concepts, num_concepts):
        out.append(f"image_concepts = {image_concepts}: not sorted unique ids in [0, {num_concepts})")
    elif not out and image_concepts != sorted({i for ids in caption_concepts for i in ids}):
        out.append(f"image_concepts {image_concepts} is not the union of its captions' concepts")
    if meta["split"] != split:
        out.append(f"split {meta['split']!r} but the manifest lists its shard under {split!r}")
    if source is not None and meta["source"] != source:
        out.append(f"source {meta['source']!r} but the manifest says {source!r}")
    return out


def decode_payload(ext: str, data: bytes) -> None:
    """Raises if the picture or feature array cannot be decoded."""
    if ext == FEATURE_EXT:
        array = np.load(io.BytesIO(data), allow_pickle=False)
        if array.ndim != 2 or array.dtype != np.float16 or 0 in array.shape:
            raise ValueError(f"region features must be a non-empty float16 [regions, dim] array, got "
                             f"{array.dtype} {array.shape}")
        return
    with Image.open(io.BytesIO(data)) as img:
        img.load()


def check_sample(key: str, member_list: list[tuple[str, bytes]], split: str,
                 files: SetFiles) -> tuple[list[str], int]:
    """Problems of one sample and its number of captions."""
    problems = []
    members = dict(member_list)
    if len(members) != len(member_list):
        problems.append(f"repeated members {sorted(ext for ext, _ in member_list)}")
    exts = sorted(members)
    payloads = [ext for ext in exts if ext in PICTURE_EXTS or ext == FEATURE_EXT]
    others = [ext for ext in exts if ext not in payloads and ext != "json"]
    if "json" not in members:
        problems.append(f"no json member (has {exts})")
    if len(payloads) != 1:
        problems.append(f"needs exactly one picture or npy member, has {payloads}")
    if others:
        problems.append(f"unexpected members {others}")
    expected_ext = files.manifest.get("image_ext")
    for ext in payloads:
        if expected_ext and ext != expected_ext:
            problems.append(f"member .{ext} but the manifest's image_ext is {expected_ext!r}")
        try:
            decode_payload(ext, members[ext])
        except Exception as e:  # PIL and numpy raise many types for broken data
            problems.append(f"undecodable .{ext}: {error_reason(e)}")
    captions = 0
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError as e:
            problems.append(f"malformed json: {e}")
        else:
            problems += check_record(meta, key, split, files.manifest.get("source"), files.num_concepts)
            if isinstance(meta, dict) and isinstance(meta.get("captions"), list):
                captions = len(meta["captions"])
    return problems, captions


def check_shard_set(root: str | Path) -> CheckResult:
    """Every problem of the shard set at root (raises ShardSetError when its json files are unusable)."""
    files = SetFiles.open(set_root(root))
    result = CheckResult()
    listed: set[str] = set()
    for split, info in files.manifest["splits"].items():
        count = result.counts.setdefault(split, SplitCount())
        ids: set[str] = set()
        for shard in info["shards"]:
            listed.add(shard)
            path = files.root / shard
            if not shard_exists(path):
                result.problems.append(f"{path}: listed in manifest.json for split {split!r} but missing")
                continue
            count.shards += 1
            try:
                for key, members in tar_samples(path):
                    problems, captions = check_sample(key, members, split, files)
                    if key in ids:
                        problems.append(f"image id repeated in split {split!r}")
                    ids.add(key)
                    result.problems += [f"{path}: sample {key!r}: {p}" for p in problems]
                    count.images += 1
                    count.captions += captions
            except (tarfile.TarError, OSError, EOFError) as e:
                result.problems.append(f"{path}: unreadable tar after {count.images} samples of {split!r}: {e}")
        for what in ("images", "captions"):
            if getattr(count, what) != info[what]:
                result.problems.append(f"{files.root / 'manifest.json'}: split {split!r} lists {info[what]} {what}, "
                                       f"its shards hold {getattr(count, what)}")
    strays = [name for name in list_names(files.root, ".tar") or [] if name not in listed]
    if strays:
        result.problems.append(f"{files.root}: shards not listed in manifest.json: {', '.join(strays[:10])}")
    return result


def shard_exists(path: Path | SetRoot) -> bool:
    """Whether a listed shard is there (at a URL: one HEAD request; an unreachable one is named when read)."""
    try:
        file_size(path)
    except FileNotFoundError:
        return False
    except OSError:
        return is_url(path)
    return True


def format_result(root: Path | SetRoot, result: CheckResult) -> str:
    lines = [f"{split}: {c.images} images, {c.captions} captions, {c.shards} shards"
             for split, c in result.counts.items()]
    if not result.problems:
        return redact_url("\n".join(lines + [f"{root}: ok"]), root)
    shown = result.problems[:MAX_SHOWN]
    more = len(result.problems) - len(shown)
    return redact_url("\n".join(lines + shown + ([f"... and {more} more"] if more else [])
                                 + [f"{root}: {len(result.problems)} problems"]), root)


def run_check(args: argparse.Namespace) -> int:
    root = set_root(args.dir)
    result = check_shard_set(root)
    print(format_result(root, result))
    return 1 if result.problems else 0


def add_check_command(subparsers) -> None:
    p = subparsers.add_parser("check", help="decode every sample of a shard set and check it against its manifest",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", help="shard-set folder (with manifest.json), or its URL (s3://, http(s)://, ...)")
    p.set_defaults(run=run_check)
