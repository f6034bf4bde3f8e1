"""Writing a shard set (format: docs/design.md section 3).

The format itself (member names, extensions, json fields, file names) is `shards.format`'s. Pictures of one
set may mix its picture formats (sources keep original bytes); a set holds either pictures or features.
A sample's json also holds "objects" where the source knows what a picture shows: the built-in corpus writes
one {"shape", "colour", "size", "row", "col"} per drawn object, ground truth for plausible-match metrics.
Tars are byte-identical for the same input (fixed member metadata), and each is written under a
temporary name and renamed when complete, so a half-written shard never looks finished.
`manifest.json` is written last: its presence marks a complete shard set.
"""
from __future__ import annotations

import io
import json
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from shards.format import FEATURE_EXT, FORMAT, FORMAT_VERSION, IMAGE_EXTS, SAMPLE_FIELDS, shard_file_name

MIXED = "mixed"  # manifest image_ext when the pictures of a set have several formats
PARTIAL_SUFFIX = ".partial"
# fields the builder must pass to close(); the writer fills in the rest
REQUIRED_MANIFEST_FIELDS = ("source", "num_concepts", "vocab_size", "spacy", "build")
_WRITER_FIELDS = ("format", "format_version", "name", "splits", "image_ext", "image_exts")
_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SPLIT = re.compile(r"[A-Za-z0-9_]+")


@dataclass
class RawSample:
    """What a source yields: one image and its captions, before concepts are attached."""

    image_id: str
    image_bytes: bytes
    image_ext: str
    captions: list[str]
    # Ground truth about the picture that does not come from its captions' words (the built-in corpus: one
    # {"shape", "colour", "size", "row", "col"} per object), for plausible-match metrics; None = unknown.
    objects: list[dict] | None = None


def _check_image_id(image_id: str) -> None:
    # WebDataset groups tar members by the name up to the first dot, so an id must not contain one
    bad = not isinstance(image_id, str) or not image_id or image_id != image_id.strip()
    if bad or any(ch in image_id for ch in "./\\"):
        raise ValueError(f"invalid image id {image_id!r}: must be a non-empty string without '.', '/', '\\' "
                         "or surrounding whitespace")


def _check_ids(ids: list[int], what: str, image_id: str) -> None:
    if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in ids) or ids != sorted(set(ids)):
        raise ValueError(f"sample {image_id!r}: {what} must be sorted unique non-negative ints, got {ids}")


@dataclass
class _SplitState:
    images: int = 0
    captions: int = 0
    shards: list[str] = field(default_factory=list)
    in_current: int = 0
    tar: tarfile.TarFile | None = None
    partial_path: Path | None = None
    ids: set[str] = field(default_factory=set)


class ShardSetWriter:
    """Streams samples into per-split tar shards of at most `shard_size` samples each."""

    def __init__(self, out_dir: str | Path, name: str, shard_size: int = 500):
        if not _NAME.fullmatch(name):
            raise ValueError(f"shard set name {name!r} must match {_NAME.pattern}")
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.name = name
        self.shard_size = shard_size
        self.image_exts: dict[str, int] = {}
        self._splits: dict[str, _SplitState] = {}
        self._closed = False
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def write(self, split: str, sample: RawSample, caption_concepts: list[list[int]], image_concepts: list[int],
              source: str) -> None:
        """Add `sample` to the split's current shard with its concepts (sorted ids, one list per caption, and the
        picture's); `source` names the corpus in the sample's json. A bad sample is refused (ValueError)."""
        image_id, image_ext, captions = sample.image_id, sample.image_ext, sample.captions
        if self._closed:
            raise RuntimeError("ShardSetWriter is closed")
        if not _SPLIT.fullmatch(split):
            raise ValueError(f"split name {split!r} must match {_SPLIT.pattern}")
        _check_image_id(image_id)
        if image_ext not in IMAGE_EXTS:
            raise ValueError(f"sample {image_id!r}: image_ext {image_ext!r} is not one of {IMAGE_EXTS}")
        if self.image_exts and (image_ext == FEATURE_EXT) != (FEATURE_EXT in self.image_exts):
            raise ValueError(f"sample {image_id!r}: image_ext {image_ext!r} cannot join a set of "
                             f"{'/'.join(self.image_exts)} samples (a set holds pictures or features, not both)")
        if not sample.image_bytes:
            raise ValueError(f"sample {image_id!r}: empty image bytes")
        if not captions or not all(isinstance(c, str) and c.strip() for c in captions):
            raise ValueError(f"sample {image_id!r}: captions must be a non-empty list of non-blank strings")
        if len(caption_concepts) != len(captions):
            raise ValueError(
                f"sample {image_id!r}: {len(captions)} captions but {len(caption_concepts)} caption_concepts")
        for ids in caption_concepts:
            _check_ids(ids, "caption_concepts", image_id)
        _check_ids(image_concepts, "image_concepts", image_id)

        state = self._splits.setdefault(split, _SplitState())
        if image_id in state.ids:
            raise ValueError(f"duplicate image id {image_id!r} in split {split!r}")
        state.ids.add(image_id)
        if state.tar is None:
            self._open_shard(split, state)
        self._add_member(state.tar, f"{image_id}.{image_ext}", sample.image_bytes)
        self._add_member(state.tar, f"{image_id}.json",
                         sample_json(split, image_id, captions, caption_concepts, image_concepts, source,
                                     sample.objects))
        self.image_exts[image_ext] = self.image_exts.get(image_ext, 0) + 1
        state.images += 1
        state.captions += len(captions)
        state.in_current += 1
        if state.in_current == self.shard_size:
            self._finish_shard(state)

    def adopt_shard(self, split: str, samples: list[tuple[str, str, int]]) -> str:
        """Count a complete shard already on disk as the split's next one (a resumed build); returns its name.

        samples: (image_id, image_ext, number of captions) of its samples in order, as `shard_contents` found.
        """
        state = self._splits.setdefault(split, _SplitState())
        if state.tar is not None:
            raise RuntimeError(f"split {split!r} has a shard open; finish it before adopting the next")
        file_name = shard_file_name(self.name, split, len(state.shards))
        if not (self.out_dir / file_name).is_file():
            raise FileNotFoundError(f"cannot adopt {self.out_dir / file_name}: no such shard")
        for image_id, image_ext, n_captions in samples:
            if image_id in state.ids:
                raise ValueError(f"duplicate image id {image_id!r} in split {split!r}")
            state.ids.add(image_id)
            self.image_exts[image_ext] = self.image_exts.get(image_ext, 0) + 1
            state.images += 1
            state.captions += n_captions
        state.shards.append(file_name)
        return file_name

    def end_shard(self, split: str) -> None:
        """Finish the split's open shard now, so the next sample starts a new one (keeps input shard boundaries)."""
        state = self._splits.get(split)
        if state is not None and state.tar is not None:
            self._finish_shard(state)

    @property
    def image_ext(self) -> str | None:
        """The set's one sample extension, MIXED when pictures have several formats, None before any sample."""
        if len(self.image_exts) > 1:
            return MIXED
        return next(iter(self.image_exts), None)

    def close(self, manifest_fields: dict) -> dict:
        """Finish the open shards and write manifest.json; returns the manifest."""
        missing = [k for k in REQUIRED_MANIFEST_FIELDS if k not in manifest_fields]
        if missing:
            raise ValueError(f"manifest fields missing: {missing}")
        clashing = [k for k in _WRITER_FIELDS if k in manifest_fields]
        if clashing:
            raise ValueError(f"manifest fields {clashing} are set by the writer and cannot be passed in")
        for state in self._splits.values():
            if state.tar is not None:
                self._finish_shard(state)
        self._closed = True
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "source": manifest_fields["source"],
            "splits": {
                split: {"images": s.images, "captions": s.captions, "shards": list(s.shards)}
                for split, s in self._splits.items()
            },
            "image_ext": self.image_ext,
            "image_exts": dict(sorted(self.image_exts.items())),
            "skipped": {},
        }
        manifest.update(manifest_fields)
        write_json(self.out_dir / "manifest.json", manifest)
        return manifest

    def _open_shard(self, split: str, state: _SplitState) -> None:
        file_name = shard_file_name(self.name, split, len(state.shards))
        state.shards.append(file_name)
        state.partial_path = self.out_dir / (file_name + PARTIAL_SUFFIX)
        state.tar = tarfile.open(state.partial_path, "w", format=tarfile.PAX_FORMAT)
        state.in_current = 0

    def _finish_shard(self, state: _SplitState) -> None:
        assert state.tar is not None and state.partial_path is not None
        state.tar.close()
        os.replace(state.partial_path, self.out_dir / state.shards[-1])
        state.tar = None
        state.partial_path = None

    @staticmethod
    def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        tar.addfile(info, io.BytesIO(data))


def sample_json(split: str, image_id: str, captions: list[str], caption_concepts: list[list[int]],
                image_concepts: list[int], source: str, objects: list[dict] | None = None) -> bytes:
    """The `{image_id}.json` member of a sample, exactly as written; "objects" only where the source knows them."""
    values = (image_id, list(captions), [list(ids) for ids in caption_concepts], list(image_concepts), split, source)
    record = dict(zip(SAMPLE_FIELDS, values))
    if objects is not None:
        record["objects"] = [dict(o) for o in objects]
    return json.dumps(record, ensure_ascii=False).encode("utf-8")


def shard_contents(path: str | Path) -> list[tuple[str, str, bytes]] | None:
    """(image_id, image_ext, json bytes) per sample of a complete shard; None when it is unreadable or is
    not pairs of `{id}.{ext}` + `{id}.json` members."""
    try:
        with tarfile.open(path, "r:") as tar:
            members = [(m.name, tar.extractfile(m).read() if m.name.endswith(".json") else b"")
                       for m in tar.getmembers() if m.isfile()]
    except (OSError, tarfile.TarError):
        return None
    if len(members) % 2:
        return None
    samples = []
    for (picture, _), (meta, data) in zip(members[0::2], members[1::2]):
        image_id, _, image_ext = picture.partition(".")
        if image_ext not in IMAGE_EXTS or meta != f"{image_id}.json":
            return None
        samples.append((image_id, image_ext, data))
    return samples


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def write_concepts_json(path: str | Path, vocab: list[tuple[str, int]]) -> None:
    """concepts.json: concept id (the position in `vocab`) -> lemma and training caption count."""
    concepts = [{"id": i, "lemma": lemma, "count": count} for i, (lemma, count) in enumerate(vocab)]
    write_json(path, {"concepts": concepts})
