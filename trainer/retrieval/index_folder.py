"""The retrieval index folder: assembled from pieces (trainer.retrieval.pieces), then read by queries and the page.

    INDEX/index.json        run, checkpoint, shard sets and split, width, counts, and each FAISS index's type,
                            parameters, build time and (approximate ones) recall@10 against exact search;
                            written last, so a folder without it is unfinished (export --resume finishes it)
    INDEX/images.faiss      picture vectors, row i = images.jsonl line i
    INDEX/captions.faiss    caption vectors, row j = captions.jsonl line j
    INDEX/images.jsonl      {"set", "shard", "key", "image_id", "caption" (its first)} per picture row: the shard
                            file and key reach the picture itself
    INDEX/captions.jsonl    {"text", "image_row"} per caption row
    INDEX/pieces/           the vectors as embedded, one piece per shard (kept: a rebuild with another
                            --index-type reads them instead of embedding again)
"""
from __future__ import annotations

import json
import tarfile
import threading
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from shards.format import PICTURE_EXTS
from shards.remote import open_shard
from trainer.retrieval.faiss_index import build_index, load_index
from trainer.retrieval.pieces import piece_path

INDEX_JSON = "index.json"
FORMAT = "hier-retrieval-index"
SIDES = ("images", "captions")
FILES = (INDEX_JSON, "images.faiss", "captions.faiss", "images.jsonl", "captions.jsonl")
RECALL_QUERIES = 1000  # held-out queries for an approximate index's recall@10
MIME = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "webp": "image/webp"}


def _loaders(out: Path, plan: list[dict], side: str) -> list[Callable[[], np.ndarray]]:
    return [partial(np.load, piece_path(out, e["piece"], f"{side}.npy"), mmap_mode="r") for e in plan]


def _sample(loaders: list[Callable[[], np.ndarray]], want: int) -> np.ndarray:
    """Up to `want` rows spread evenly over the pieces (the held-out queries of a recall check)."""
    total = sum(int(load().shape[0]) for load in loaders)
    stride = max(1, total // max(want, 1))
    parts, offset = [], 0
    for load in loaders:
        x = load()
        first = (-offset) % stride
        parts.append(np.asarray(x[first::stride], dtype=np.float32))
        offset += x.shape[0]
    return np.concatenate(parts)[:want] if parts else np.zeros((0, 0), np.float32)


def _write_rows(out: Path, plan: list[dict]) -> dict:
    """images.jsonl and captions.jsonl from the pieces' records, one piece at a time; returns the counts."""
    counts = {"images": 0, "captions": 0, "skipped": 0}
    with open(out / ".images.jsonl.tmp", "w") as images, open(out / ".captions.jsonl.tmp", "w") as captions:
        for entry in plan:
            record = json.loads(piece_path(out, entry["piece"], "json").read_text())
            for row in record["images"]:
                images.write(json.dumps({"set": entry["set"], "shard": entry["shard"], "key": row["key"],
                                         "image_id": row["image_id"], "caption": row["captions"][0]}) + "\n")
                for text in row["captions"]:
                    captions.write(json.dumps({"text": text, "image_row": counts["images"]}) + "\n")
                counts["images"] += 1
                counts["captions"] += len(row["captions"])
            counts["skipped"] += record.get("skipped", 0)
    for side in SIDES:
        (out / f".{side}.jsonl.tmp").replace(out / f"{side}.jsonl")
    return counts


def assemble(out: str | Path, plan: list[dict], meta: dict, kind: str, log: Callable[[str], None] = print) -> dict:
    """Rank 0, once every piece is written: row files, one FAISS index per side, then index.json."""
    out = Path(out)
    missing = [e["piece"] for e in plan if not piece_path(out, e["piece"], "json").is_file()]
    if missing:
        raise RuntimeError(f"pieces {missing[:5]} of {out} are not written; run the export again with --resume")
    counts = _write_rows(out, plan)
    loaders = {side: _loaders(out, plan, side) for side in SIDES}
    indexes = {}
    for side, other in (("images", "captions"), ("captions", "images")):
        # held-out queries for the recall check: the other side's vectors, which are not rows of this index
        queries = _sample(loaders[other], RECALL_QUERIES) if kind != "flat" else None
        indexes[side] = build_index(loaders[side], meta["dim"], kind, out / f"{side}.faiss", queries, log)
    meta = {"format": FORMAT, **meta, "counts": counts, "pieces": len(plan), "index": indexes}
    tmp = out / f".{INDEX_JSON}.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(out / INDEX_JSON)
    return meta


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except ValueError as e:
                raise ValueError(f"{path} line {number} is not JSON ({e}); rebuild the index with "
                                 f"`trainer.retrieve export --overwrite`") from e
    return rows


class RetrievalIndex:
    """An index folder, opened: index.json, both FAISS indexes and the row records. Thread-safe for reading."""

    def __init__(self, folder: str | Path):
        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"index folder {folder} does not exist (write it with `trainer.retrieve export`)")
        missing = [name for name in FILES if not (folder / name).is_file()]
        if missing:
            hint = "an unfinished export: run it again with --resume" if (folder / "pieces").is_dir() else \
                "write it with `trainer.retrieve export`"
            raise FileNotFoundError(f"index folder {folder} lacks {', '.join(missing)} ({hint})")
        try:
            meta = json.loads((folder / INDEX_JSON).read_text())
            if meta.get("format") != FORMAT:
                raise ValueError(f"format is {meta.get('format')!r}, not {FORMAT!r}")
        except (ValueError, AttributeError) as e:
            raise ValueError(f"{folder / INDEX_JSON} is not a retrieval index record ({e}); rebuild the index "
                             f"with `trainer.retrieve export --overwrite`") from e
        self.folder, self.meta = folder, meta
        self.rows = {side: _read_jsonl(folder / f"{side}.jsonl") for side in SIDES}
        self.faiss = {side: load_index(folder / f"{side}.faiss", meta["index"][side]) for side in SIDES}
        for side in SIDES:
            if self.faiss[side].ntotal != len(self.rows[side]) or self.faiss[side].d != meta["dim"]:
                raise ValueError(f"{folder / (side + '.faiss')} holds {self.faiss[side].ntotal} rows of "
                                 f"{self.faiss[side].d} dims but {side}.jsonl has {len(self.rows[side])} rows and "
                                 f"index.json says {meta['dim']} dims; rebuild with `export --overwrite`")
        self._members: dict[str, dict] = {}
        self._lock = threading.Lock()

    def search(self, side: str, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Scores and rows [Q, k'] (k' = min(k, rows)) of `side` for query vectors [Q, dim]."""
        k = min(k, len(self.rows[side]))
        if k < 1:
            return np.zeros((len(vectors), 0), np.float32), np.zeros((len(vectors), 0), np.int64)
        return self.faiss[side].search(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1, self.meta["dim"]), k)

    def picture(self, row: int) -> tuple[bytes, str]:
        """The bytes and MIME type of picture row `row`, read from its shard by key (never a path from outside)."""
        if not 0 <= row < len(self.rows["images"]):
            raise IndexError(f"picture row {row} is out of range [0, {len(self.rows['images'])})")
        record = self.rows["images"][row]
        shard = record["shard"]
        with self._lock:
            members = self._members.get(shard)
            if members is None:  # name -> (offset, size) for the whole shard, read once (a URL: streamed)
                with open_shard(shard) as f, tarfile.open(fileobj=f, mode="r:") as tar:
                    members = {m.name: (m.offset_data, m.size) for m in tar.getmembers() if m.isfile()}
                self._members[shard] = members
        for ext in PICTURE_EXTS:
            if f"{record['key']}.{ext}" in members:
                offset, size = members[f"{record['key']}.{ext}"]
                with open_shard(shard) as f:
                    f.seek(offset)
                    return f.read(size), MIME.get(ext, "application/octet-stream")
        raise LookupError(f"{record['key']} in {shard} has no picture (region-feature shards hold none)")
