"""FAISS indexes over retrieval vectors written in pieces (trainer.retrieval.pieces), built with bounded memory.

Inner product is the model's score ([g; sqrt(w) l] . [g; sqrt(w) l], docs/design.md section 1), so every index is
an inner-product one:
  flat   exact (IndexFlatIP), the default: what evaluation's matrix product ranks, row for row;
  hnsw   approximate graph (IndexHNSWFlat), no training; its build is slow at wide vectors, so for small corpora;
  ivf    approximate inverted lists (IVF + 8-bit scalar quantiser, a quarter of flat's memory), trained on a
         sample of the pieces; for larger corpora;
  auto   hnsw below AUTO_IVF_FROM rows, ivf from there.
Pieces are added one at a time: the only corpus-sized thing in memory is the index itself. An approximate
index measures its recall@10 against exact search on a sample of the other side's vectors (queries that are not
in the index) at build time, by streaming the pieces, and the figure goes into index.json.

    from trainer.retrieval.faiss_index import build_index, load_index
    params = build_index(piece_files, dim, "hnsw", "out/images.faiss", queries=caption_sample)
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

KINDS = ("flat", "hnsw", "ivf", "auto")
AUTO_IVF_FROM = 10_000  # HNSW's graph build is slow at 2,048 dims (20,000 rows: 2 minutes on 2 cores)
RECALL_K = 10


def faiss_library():
    """faiss, or a clear way out (it is in setup.py's install_requires as faiss-cpu)."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - install problem
        raise ImportError("trainer.retrieve needs FAISS: pip install faiss-cpu") from e
    return faiss


def index_params(kind: str, rows: int) -> dict:
    """The index type and its parameters for `rows` vectors (what index.json records)."""
    if kind not in KINDS:
        raise ValueError(f"--index-type must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "auto":
        kind = "ivf" if rows >= AUTO_IVF_FROM else "hnsw"
    if kind == "flat":
        return {"type": "flat", "metric": "inner_product"}
    if kind == "hnsw":
        # M 32 / efSearch 128 give recall@10 near 0.99 on unit-norm vectors; efConstruction trades build time
        return {"type": "hnsw", "metric": "inner_product", "M": 32, "efConstruction": 80, "efSearch": 128}
    # nlist about sqrt(n) (the low end of FAISS's guideline: k-means training and list assignment stay minutes
    # on a few CPU cores at a million rows) with at least 39 training rows per list; nprobe 10% of lists, 16 at least
    nlist = max(1, min(int(round(math.sqrt(max(rows, 1)))), rows // 39))
    return {"type": "ivf", "metric": "inner_product", "nlist": nlist, "nprobe": min(nlist, max(16, nlist // 10)),
            "quantizer": "SQ8", "train_rows": min(rows, max(nlist * 50, 10_000))}


def new_index(params: dict, dim: int):
    faiss = faiss_library()
    if params["type"] == "flat":
        return faiss.IndexFlatIP(dim)
    if params["type"] == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["M"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]
        return index
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFScalarQuantizer(quantizer, dim, params["nlist"], faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.nprobe = params["nprobe"]
    return index


def _training_sample(pieces: list[Callable[[], np.ndarray]], rows: int, want: int, seed: int = 0) -> np.ndarray:
    """About `want` rows drawn evenly from every piece (never the whole corpus at once)."""
    rng = np.random.default_rng(seed)
    share = min(1.0, want / max(rows, 1))
    parts = []
    for load in pieces:
        x = load()
        take = rng.random(x.shape[0]) < share
        parts.append(np.ascontiguousarray(x[take], dtype=np.float32))
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def build(pieces: list[Callable[[], np.ndarray]], dim: int, kind: str, queries: np.ndarray | None = None,
          rows: int | None = None, log: Callable[[str], None] = print) -> tuple[object, dict]:
    """An index of the pieces (callables that load one [rows, dim] float32 array each, e.g. np.load with
    mmap_mode="r") and index.json's record of it: type, parameters, rows, build seconds and, for an approximate
    index with `queries`, recall@10 against exact search. `rows`: the total, when the pieces know it cheaply."""
    if rows is None:
        rows = sum(int(load().shape[0]) for load in pieces)  # mmap'd: shapes only, no data read
    params = index_params(kind, rows)
    start = time.perf_counter()
    index = new_index(params, dim)
    if params["type"] == "ivf":
        sample = _training_sample(pieces, rows, params["train_rows"])
        log(f"training IVF ({params['nlist']} lists) on {sample.shape[0]} of {rows} rows")
        index.train(sample)
        del sample
    for load in pieces:
        x = np.ascontiguousarray(load(), dtype=np.float32)
        if x.shape[0]:
            index.add(x)
    params.update(rows=int(index.ntotal), dim=dim, build_seconds=round(time.perf_counter() - start, 3))
    if params["type"] != "flat" and queries is not None and len(queries) and rows:
        params["recall_at_10"] = round(recall_at_k(index, pieces, queries, RECALL_K), 4)
        params["recall_queries"] = int(len(queries))
        log(f"{params['type']} index of {rows} rows: recall@{RECALL_K} {params['recall_at_10']:.4f} against exact "
            f"search on {len(queries)} held-out queries")
    return index, params


def build_index(pieces: list[Callable[[], np.ndarray]], dim: int, kind: str, out: str | Path,
                queries: np.ndarray | None = None, log: Callable[[str], None] = print) -> dict:
    """build(), then write the index to `out` (under a temporary name first); returns its index.json record."""
    index, params = build(pieces, dim, kind, queries, log=log)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    faiss_library().write_index(index, str(tmp))
    tmp.replace(out)  # never a half-written index under the real name
    return params


def exact_top_k(pieces: Iterable[Callable[[], np.ndarray]], queries: np.ndarray, k: int) -> np.ndarray:
    """Exact top-k row numbers [Q, k] for `queries`, one piece at a time (the ground truth for recall)."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    offset = 0
    for load in pieces:
        x = np.asarray(load(), dtype=np.float32)
        scores = queries @ x.T
        rows = np.broadcast_to(np.arange(offset, offset + x.shape[0]), scores.shape)
        best_scores = np.concatenate([best_scores, scores], 1)
        best_rows = np.concatenate([best_rows, rows], 1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores = np.take_along_axis(best_scores, keep, 1)
        best_rows = np.take_along_axis(best_rows, keep, 1)
        offset += x.shape[0]
    return best_rows


def recall_at_k(index, pieces: list[Callable[[], np.ndarray]], queries: np.ndarray, k: int) -> float:
    """Mean share of the exact top-k that the index returns in its own top-k."""
    k = min(k, int(index.ntotal))
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    _, found = index.search(queries, k)
    truth = exact_top_k(pieces, queries, k)
    return float(np.mean([len(set(a.tolist()) & set(b.tolist())) / k for a, b in zip(found, truth)]))


def load_index(path: str | Path, params: dict):
    """Read an index file written by build_index, with its search-time parameters from index.json."""
    faiss = faiss_library()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as e:  # FAISS reports a truncated or foreign file as a RuntimeError
        reason = str(e).rsplit("Error: ", 1)[-1].splitlines()[0][:120]
        raise ValueError(f"{path} is not a readable FAISS index ({reason}); "
                         f"rebuild it with `trainer.retrieve export`") from e
    if params.get("type") == "hnsw":
        index.hnsw.efSearch = params["efSearch"]
    elif params.get("type") == "ivf":
        index.nprobe = params["nprobe"]
    return index
