"""Retrieval at corpus scale (issue 16): FAISS indexes built by trainer.retrieval.faiss_index, on 1,000,000 synthetic
vectors of COCO's retrieval width and on the built-in corpus's test split.

Width: configs/coco_butd_bigru.yaml's model.embed_dim, doubled when its loss has a local space ([g; sqrt(w) l]):
1,024 x 2 = 2,048 float32 (8.2 GB for a million rows). The synthetic rows are unit vectors around 4,096
random centres (embeddings of real corpora cluster; uniform noise is every approximate index's worst case),
generated piece by piece (100,000 rows) as an export writes them; queries are 300 more such vectors,
held out of the index. The built-in part exports a 2-step run (configs/builtin.yaml widths) of a freshly built
built-in corpus (1,000 test pictures, 5,000 captions), or reads --builtin-index; its queries are its captions.

Per index (flat = exact IndexFlatIP, ivf = IVF + 8-bit scalar quantiser, hnsw for the small corpus):
  build seconds, RSS growth while building (GB), p50 / p99 latency of single queries (ms), recall@10 of the
  approximate index against exact search, and for exact search the time of a batch of 128 queries against
  a bare torch.mm + topk(10) over the same vectors (zero-copy: FAISS's own storage) with the same threads.
  Goal: exact <= 1.2 x torch.

Exact commands (from the repository root; the 1M part needs about 11 GB of RAM and took 48 minutes on 2 CPU
cores shared with other jobs, most of it generating vectors, IVF's k-means and exact single queries):
    python bench/search.py                          # both parts
    python bench/search.py --rows 200000            # a smaller synthetic corpus
    python bench/search.py --skip-synthetic --builtin-index runs/builtin/index
Output: a table, then as the last line one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trainer.retrieval.faiss_index import build, faiss_library, index_params  # noqa: E402

PIECE_ROWS = 100_000
CENTRES = 4096


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def retrieval_width(config: Path) -> int:
    from trainer.config import load_config
    cfg = load_config(config, [], check_paths=False)  # the width only: COCO's shards need not be here
    return cfg.model.embed_dim * (2 if cfg.loss.local != "none" else 1)


def synthetic_loaders(rows: int, dim: int, seed: int = 0):
    """Callables that each make one piece of unit vectors near shared centres (the same piece every call)."""
    centres = np.random.default_rng(seed).standard_normal((CENTRES, dim)).astype(np.float32)

    def piece(i: int, n: int) -> np.ndarray:
        rng = np.random.default_rng(seed + 1 + i)
        x = centres[rng.integers(0, CENTRES, n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    sizes = [min(PIECE_ROWS, rows - start) for start in range(0, rows, PIECE_ROWS)]
    return [lambda i=i, n=n: piece(i, n) for i, n in enumerate(sizes)], lambda n: piece(10**6, n)  # held out


def latency_ms(index, queries: np.ndarray, k: int = 10) -> tuple[float, float]:
    times = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def exact_vs_torch(index, rows: int, dim: int, queries: np.ndarray, rounds: int = 2) -> dict:
    """A batch of queries through IndexFlatIP and through torch.mm + topk on the same memory, same threads."""
    faiss = faiss_library()
    torch.set_num_threads(faiss.omp_get_max_threads())
    stored = torch.from_numpy(faiss.rev_swig_ptr(index.get_xb(), rows * dim).reshape(rows, dim))
    q = torch.from_numpy(queries)
    ratios, faiss_s, torch_s = [], [], []
    for _ in range(rounds):  # alternating rounds: the machine is shared, only side-by-side figures compare
        start = time.perf_counter()
        _, found = index.search(queries, 10)
        faiss_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        top = torch.mm(q, stored.T).topk(10, dim=1).indices
        torch_s.append(time.perf_counter() - start)
        ratios.append(faiss_s[-1] / torch_s[-1])
    agree = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), top.tolist())]))
    return {"faiss_s": round(min(faiss_s), 3), "torch_s": round(min(torch_s), 3),
            "ratio": round(float(np.median(ratios)), 3), "agreement": agree, "queries": len(queries)}


def measure(name: str, loaders, rows: int, dim: int, queries: np.ndarray, kinds: list[str],
            latency_queries: int) -> list[dict]:
    """Build each kind of index from the pieces and time it; recall against the flat index's answers."""
    results, truth = [], None
    for kind in kinds:
        before = rss_gb()
        index, params = build(loaders, dim, kind, rows=rows, log=lambda m: print(m, file=sys.stderr))
        grown = rss_gb() - before
        p50, p99 = latency_ms(index, queries[:latency_queries])
        _, found = index.search(queries, 10)
        row = {"corpus": name, "index": kind, "rows": params["rows"], "dim": dim,
               "build_s": params["build_seconds"], "rss_gb": round(grown, 2), "p50_ms": round(p50, 2),
               "p99_ms": round(p99, 2), "params": {k: v for k, v in params.items()
                                                   if k not in ("rows", "dim", "build_seconds", "metric", "type")}}
        if kind == "flat":
            truth = found
            row["exact_vs_torch"] = exact_vs_torch(index, params["rows"], dim, queries[:128])
        elif truth is not None:
            row["recall_at_10"] = round(float(np.mean([len(set(a) & set(b)) / 10 for a, b in
                                                       zip(found.tolist(), truth.tolist())])), 4)
        results.append(row)
        print(f"{name} {kind}: {row}", file=sys.stderr, flush=True)
        del index
    return results


def builtin_pieces(index_dir: Path | None, tmp: Path):
    """The pieces (image side) and caption queries of an exported built-in test split; made here if not given."""
    if index_dir is None:
        from tests.conftest import build_builtin
        from trainer.config import load_config
        from trainer.retrieval.commands import export_index
        from trainer.training.loop import train

        shards = build_builtin(tmp / "builtin", 256, 32, 1000, 250)
        run = tmp / "run"
        train(load_config(REPO / "configs" / "builtin.yaml", [
            f"data.shards={shards}", f"run.out_dir={run}", "data.num_workers=1", "train.steps=2",
            "train.eval_every=0", "train.ckpt_every=0", "train.log_every=1"]))
        index_dir = tmp / "index"
        export_index(run, index_dir)
    pieces = sorted((index_dir / "pieces").glob("p*.images.npy"))
    loaders = [lambda p=p: np.load(p, mmap_mode="r") for p in pieces]
    captions = np.concatenate([np.load(str(p).replace(".images.", ".captions.")) for p in pieces])
    return loaders, np.ascontiguousarray(captions[:: max(1, len(captions) // 1000)][:1000], dtype=np.float32)


def table(results: list[dict]) -> str:
    head = f"{'corpus':<10}{'index':<6}{'rows':>10}{'dim':>6}{'build s':>9}{'RSS GB':>8}{'p50 ms':>9}{'p99 ms':>9}" \
           f"{'R@10':>7}  exact vs torch.mm+topk"
    lines = [head, "-" * len(head)]
    for r in results:
        vs = r.get("exact_vs_torch")
        recall = r.get("recall_at_10", 1.0) if r["index"] == "flat" else r.get("recall_at_10", float("nan"))
        lines.append(f"{r['corpus']:<10}{r['index']:<6}{r['rows']:>10,}{r['dim']:>6}{r['build_s']:>9.1f}"
                     f"{r['rss_gb']:>8.2f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                     f"{recall:>7.3f}"
                     + (f"  {vs['faiss_s']:.3f} s vs {vs['torch_s']:.3f} s = {vs['ratio']:.2f}x "
                        f"({vs['queries']} queries)" if vs else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000, help="synthetic rows (default 1,000,000)")
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "coco_butd_bigru.yaml",
                        help="the config whose retrieval width the synthetic vectors take")
    parser.add_argument("--latency-queries", type=int, default=50, help="single queries timed per index")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--skip-builtin", action="store_true")
    parser.add_argument("--builtin-index", type=Path, default=None, help="an exported built-in index folder")
    args = parser.parse_args()
    faiss = faiss_library()
    results, env = [], {"threads": faiss.omp_get_max_threads(), "cpus": os.cpu_count(), "faiss": faiss.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if not args.skip_builtin:
            loaders, queries = builtin_pieces(args.builtin_index, tmp)
            rows = sum(int(load().shape[0]) for load in loaders)
            results += measure("builtin", loaders, rows, queries.shape[1], queries, ["flat", "hnsw", "ivf"],
                               args.latency_queries)
        if not args.skip_synthetic:
            dim = retrieval_width(args.config)
            loaders, make_queries = synthetic_loaders(args.rows, dim)
            queries = make_queries(300)  # recall@10 +- 2% at 300; each exact 1M-row query reads 8 GB
            kinds = ["flat", index_params("auto", args.rows)["type"]]
            results += measure("synthetic", loaders, args.rows, dim, queries, kinds, args.latency_queries)
    print(table(results))
    print(json.dumps({"bench": "search", **env, "results": results}))


if __name__ == "__main__":
    main()
