"""The shard-set format (docs/design.md section 3), defined once: shards/ writes and checks it, trainer/ reads it.

A shard set is a folder of `NAME-SPLIT-000000.tar ...` plus MANIFEST, CONCEPTS and VOCAB. Each picture is one
WebDataset sample: `{image_id}.{ext}` (the picture's own bytes, one of PICTURE_EXTS, or float16 region features
[regions, dim] saved by np.save, FEATURE_EXT) and `{image_id}.json` (the fields of SAMPLE_FIELDS). A set holds
pictures or features, never both. Standard library only: importing the format drags in nothing else.
"""
from __future__ import annotations

import os
from pathlib import Path

FORMAT = "hier-shards"  # manifest.json's "format"
FORMAT_VERSION = 1
PICTURE_EXTS = ("jpg", "jpeg", "png", "webp")
FEATURE_EXT = "npy"
IMAGE_EXTS = (*PICTURE_EXTS, FEATURE_EXT)  # every member extension that carries a sample's image side
META_EXT = "json"
SAMPLE_FIELDS = ("image_id", "captions", "caption_concepts", "image_concepts", "split", "source")
MANIFEST, CONCEPTS, VOCAB = "manifest.json", "concepts.json", "vocab.json"
SHARD_SET_FILES = (MANIFEST, CONCEPTS, VOCAB)


def shard_file_name(name: str, split: str, index: int) -> str:
    return f"{name}-{split}-{index:06d}.tar"


def is_manifest(manifest: object) -> bool:
    """Whether a parsed manifest.json declares this format (and lists its splits)."""
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT and "splits" in manifest


def link_out_of_set(root: str | os.PathLike, path: str | os.PathLike) -> str | None:
    """Why the file `path` of the local shard set at `root` is not read, or None: a symbolic link whose target lies
    outside the set's folder. Such a link is never followed (the set would read files that are not its own, which
    may change or vanish under it); a link inside the set is fine."""
    if not os.path.islink(path):
        return None
    target = Path(path).resolve()
    if target.is_relative_to(Path(root).resolve()):
        return None
    return (f"{path} is a symlink to {target}, outside the shard set {root}; links out of a set are not followed: "
            "copy the file into the set")


def first_link_out(root: str | os.PathLike, names) -> str | None:
    """Why the first of `names` (files of the local shard set at `root`) that is a symlink out of the set is not read
    (link_out_of_set), or None. Every reader of a local set asks this where it opens the set."""
    return next((why for why in (link_out_of_set(root, Path(root) / str(name)) for name in names) if why), None)
