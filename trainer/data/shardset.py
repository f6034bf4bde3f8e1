"""A shard set as the trainer reads it (through its documented format, defined once in `shards.format`:
`manifest.json`, `concepts.json`, `vocab.json` and tars of `{image_id}.{jpg,jpeg,png,webp,npy}` + `{image_id}.json`),
in a local folder or at a URL (`shards.remote`: fsspec, ranged reads, retries), or, for a mixed-in training set
only, webdataset's `pipe:COMMAND` form with brace lists (no manifest: it shares data.shards' vocabularies and is
read forward only), mixing several sets for training,
the check that every loader worker gets a shard, and the stable hash that lets string image ids travel in tensors.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from shards.format import CONCEPTS, MANIFEST, VOCAB, first_link_out, is_manifest
from shards.remote import SetRoot, expand_pipe, is_pipe, open_shard, read_text, set_root
from trainer.data.text import Vocab


def use_fsspec_for_webdataset() -> None:
    """webdataset's readers (evaluation, the first-sample check) open URLs through its `gopen_schemes` table, which
    has curl for http(s) and nothing for s3: every fsspec protocol is routed to open_shard instead, so all reads of
    a URL shard set share one client, its credentials, timeouts and retries. `pipe:` keeps webdataset's own."""
    from webdataset.gopen import gopen_schemes  # lazy: webdataset pulls in torch; only URL sets need this

    def gopen_fsspec(url, mode="rb", bufsize=8192, **kw):
        if mode != "rb":
            raise ValueError(f"{url}: shard sets at a URL are read-only here")
        return open_shard(url)

    import fsspec  # lazy: see url_filesystem
    for protocol in fsspec.available_protocols():
        if protocol not in ("pipe", "file", "local"):
            gopen_schemes[protocol] = gopen_fsspec


def image_id_hash(image_id: str) -> int:
    """A stable 63-bit integer for a string image id, so ids can travel in tensors and be all-gathered."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little") & (2**63 - 1)


@dataclass
class ShardSet:
    """A shard set, in a local folder or at a URL: its manifest, concept vocabulary and word vocabulary."""

    root: Path | SetRoot | str  # a str: a pipe: spec
    manifest: dict
    concepts: list[str]
    vocab: Vocab

    @classmethod
    def open(cls, root: str | Path) -> "ShardSet":
        """Reads the set's three small files once (at a URL: one request each; its shards stay where they are).
        A local set whose files or shards are symlinks out of its folder is refused naming the link and its target
        (shards.format.first_link_out), for every reader: evaluation, export, feature extraction, training."""
        root = set_root(root)
        if isinstance(root, SetRoot):
            use_fsspec_for_webdataset()
        else:
            _refuse_links_out(root, (MANIFEST, CONCEPTS, VOCAB))
        manifest_path = root / MANIFEST
        try:
            manifest = json.loads(read_text(manifest_path))
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read shard-set manifest {manifest_path}: {e}") from e
        if not is_manifest(manifest):
            raise ValueError(f"{manifest_path} is not a hier-shards manifest (format/splits missing)")
        concepts_path = root / CONCEPTS
        try:
            entries = json.loads(read_text(concepts_path))["concepts"]
            concepts = [e["lemma"] for e in sorted(entries, key=lambda e: e["id"])]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read concept vocabulary {concepts_path}: {e}") from e
        try:
            vocab = Vocab(json.loads(read_text(root / VOCAB))["words"])
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot read word vocabulary {root / VOCAB}: {e}") from e
        if not isinstance(root, SetRoot):
            _refuse_links_out(root, [name for info in manifest["splits"].values() if isinstance(info, dict)
                                     for name in info.get("shards", [])])
        return cls(root, manifest, concepts, vocab)

    @classmethod
    def pipe(cls, spec: str, like: "ShardSet", split: str) -> "ShardSet":
        """A `pipe:COMMAND` set (brace lists expanded, one command per shard): the `split` of training samples and
        nothing else, with the vocabularies of `like` (it has no files of its own to read them from). Its size is
        unknown (0 pictures in its manifest): data.mix_weights gives its share."""
        manifest = {"format": like.manifest.get("format"), "splits": {split: {
            "shards": expand_pipe(spec), "images": 0, "captions": 0}}}
        return cls(spec, manifest, like.concepts, like.vocab)

    @property
    def num_concepts(self) -> int:
        return len(self.concepts)

    def split_info(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise ValueError(f"split {split!r} not in {self.root / 'manifest.json'}")
        return self.manifest["splits"][split]

    def urls(self, split: str) -> list[str]:
        """The split's shards, local paths or URLs. Local ones must exist; at a URL, asking for each of thousands
        would cost a request per shard: a missing one is counted when it is read (the config check looks for the
        first shard of each split)."""
        if is_pipe(self.root):
            return list(self.split_info(split)["shards"])  # the commands themselves
        urls = [str(self.root / name) for name in self.split_info(split)["shards"]]
        missing = [] if isinstance(self.root, SetRoot) else [u for u in urls if not Path(u).is_file()]
        if missing:
            raise FileNotFoundError(f"shard files listed in {self.root / 'manifest.json'} are missing: {missing[:3]}")
        return urls


def _refuse_links_out(root: Path, names) -> None:
    why = first_link_out(root, names)
    if why is not None:
        raise ValueError(why)


def require_same_vocabularies(other: ShardSet, reference: ShardSet) -> None:
    """ValueError naming the file unless `other` has `reference`'s concept and word vocabularies (labels and
    token ids mean the same in both)."""
    for what, file, same in (("concept", "concepts.json", other.concepts == reference.concepts),
                             ("word", "vocab.json", other.vocab.words == reference.vocab.words)):
        if not same:
            raise ValueError(f"{other.root / file}: its {what} vocabulary differs from {reference.root / file}; "
                             f"build the set with `python -m shards build ... --vocab-from {reference.root}`")


def mix_sets(shardset: ShardSet, extra_roots: list[str], weights: list[float],
             split: str) -> list[tuple[ShardSet, float]]:
    """[(shard set, share of the training samples)] for data.mix_shards, `shardset` first; [] without a mix.
    The sets must share one concept and word vocabulary: labels and token ids mean the same in every batch (a
    `pipe:` set has none of its own to compare: it is taken to share shardset's)."""
    if not extra_roots:
        return []
    sets = [shardset] + [ShardSet.pipe(root, shardset, split) if is_pipe(root) else ShardSet.open(root)
                         for root in extra_roots]
    for extra in sets[1:]:
        require_same_vocabularies(extra, shardset)
    weights = weights or [s.split_info(split)["images"] for s in sets]
    total = float(sum(weights))
    return [(s, w / total) for s, w in zip(sets, weights)]


def check_shards_for_workers(num_shards: int, world_size: int, num_workers: int, split: str) -> None:
    """Without resampling every worker of every rank needs its own shard, or some read nothing."""
    needed = world_size * max(1, num_workers)
    if num_shards < needed:
        raise ValueError(f"split {split!r} has {num_shards} shards but {world_size} ranks x {max(1, num_workers)} "
                         f"workers need at least {needed}; rebuild with a smaller --shard-size, lower "
                         f"data.num_workers, or use data.resampled=true")
