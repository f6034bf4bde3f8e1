"""Retrieval with a trained run: export a split's retrieval vectors to an index folder, then query it.

Export the test split of a run's last checkpoint (any ZeRO stage: the checkpoint is loaded through the engine):
    python -m trainer.retrieve export --run runs/builtin --out runs/builtin/index
    python -m trainer.retrieve export --run runs/builtin --checkpoint step0000120 --split val --out INDEX_DIR
Query it with a caption (ranks pictures) or a picture file (ranks captions):
    python -m trainer.retrieve query --index runs/builtin/index --text "a red star" --k 5
    python -m trainer.retrieve query --index runs/builtin/index --image star.png

The index folder holds image_vectors.npy and caption_vectors.npy (float32 rows [g; sqrt(w) l], the model's
`retrieval_vector`), images.json (image ids in row order), captions.json (caption text and its image's row)
and index.json (run, checkpoint, split, config). A score is the dot product of two rows, as in evaluation.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from trainer.data import RegionSpec, decode_image, pad_tokens
from trainer.distributed import broadcast_object
from trainer.evaluate import LoadedRun, add_checkpoint_arguments, embed_split, load_run
from trainer.factory import build_tokenizer

INDEX_FILES = ("index.json", "image_vectors.npy", "caption_vectors.npy", "images.json", "captions.json")


def export_index(run_dir: str | Path, out_dir: str | Path, split: str | None = None,
                 checkpoint: str = "latest") -> dict:
    """Embed a split with a run's checkpoint and write the index folder (rank 0 writes); returns index.json."""
    run_dir = Path(run_dir).resolve()
    run = load_run(run_dir, checkpoint)
    cfg, info = run.cfg, run.info
    split = split or cfg.data.test_split
    emb = embed_split(run.model, run.shardset, split, image_size=cfg.data.image_size, max_words=cfg.data.max_words,
                      batch_size=cfg.data.eval_batch_size, rank=info.rank, world=info.world_size,
                      tokenizer=build_tokenizer(cfg, run.shardset.vocab), regions=RegionSpec.from_config(cfg))
    meta = broadcast_object(_write_index(run, emb, split, run_dir, out_dir) if info.is_main else None)
    return meta


def _write_index(run: LoadedRun, emb: dict, split: str, run_dir: Path, out_dir: str | Path) -> dict:
    """Rank 0, which holds the gathered embeddings, writes the index folder."""
    cfg = run.cfg
    emb = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in emb.items()}
    image_vectors = run.model.retrieval_vector(emb["img_g"], emb["img_l"]).float().numpy()
    caption_vectors = run.model.retrieval_vector(emb["cap_g"], emb["cap_l"]).float().numpy()
    meta = {
        "run": str(run_dir),
        "config": str(run_dir / "config.yaml"),
        "checkpoint": run.load_path,
        "checkpoint_tag": Path(run.load_path).parent.name,  # the query reloads exactly this checkpoint
        "step": run.step,
        "split": split,
        "local_score_weight": cfg.model.local_score_weight,
        "dim": int(image_vectors.shape[1]),
        "counts": {"images": int(image_vectors.shape[0]), "captions": int(caption_vectors.shape[0])},
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "image_vectors.npy", np.ascontiguousarray(image_vectors, dtype=np.float32))
    np.save(out / "caption_vectors.npy", np.ascontiguousarray(caption_vectors, dtype=np.float32))
    (out / "images.json").write_text(json.dumps(emb["image_ids"]))
    captions = [{"text": c, "image_row": int(r)} for c, r in zip(emb["captions"], emb["cap_to_img"].tolist())]
    (out / "captions.json").write_text(json.dumps(captions, indent=0))
    (out / "index.json").write_text(json.dumps(meta, indent=2))
    return meta


def read_index(index_dir: str | Path) -> dict:
    """index.json, the vectors and the row labels of an index folder; a missing or broken one is named."""
    index_dir = Path(index_dir)
    if not index_dir.is_dir():
        raise FileNotFoundError(f"index folder {index_dir} does not exist (write it with `trainer.retrieve export`)")
    missing = [name for name in INDEX_FILES if not (index_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"index folder {index_dir} lacks {', '.join(missing)}")
    meta = json.loads((index_dir / "index.json").read_text())
    index = {"meta": meta, "images": json.loads((index_dir / "images.json").read_text()),
             "captions": json.loads((index_dir / "captions.json").read_text()),
             "image_vectors": np.load(index_dir / "image_vectors.npy"),
             "caption_vectors": np.load(index_dir / "caption_vectors.npy")}
    if len(index["images"]) != index["image_vectors"].shape[0] or \
            len(index["captions"]) != index["caption_vectors"].shape[0]:
        raise ValueError(f"index folder {index_dir}: vector rows do not match images.json/captions.json")
    return index


@torch.no_grad()
def encode_query(run: LoadedRun, text: str | None = None, image_path: str | Path | None = None) -> np.ndarray:
    """The query's retrieval vector [D] (float32), encoded as evaluation encodes captions and pictures."""
    model, cfg = run.model, run.cfg
    model.eval()
    device = next(iter(model.parameters())).device
    if text is not None:
        tokenizer = build_tokenizer(cfg, run.shardset.vocab)
        tokens, lengths = pad_tokens([tokenizer.encode(text)], tokenizer.pad_id)
        g, l = model.encode_text(tokens.to(device), lengths)
    else:
        if RegionSpec.from_config(cfg) is not None:
            raise ValueError(f"{image_path}: this run reads region features, not pictures (model.image_encoder="
                             f"regions); query it with --text, or with a run that has a picture encoder")
        image = decode_image(Path(image_path).read_bytes(), cfg.data.image_size)
        g, l = model.encode_image(image[None].to(device))
    return model.retrieval_vector(g, l)[0].float().cpu().numpy()


def query_index(index_dir: str | Path, text: str | None = None, image_path: str | Path | None = None,
                k: int = 5, run: LoadedRun | None = None) -> list[dict]:
    """Top-k of the other side for one query: a text ranks pictures, a picture ranks captions.
    Each hit: rank, score, row, image_id (and caption, for caption hits). `run`: the index's checkpoint, already
    loaded with `load_run` (several queries then load it once). Leaves the process group up."""
    if (text is None) == (image_path is None):
        raise ValueError("give exactly one query: text or image_path")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if image_path is not None and not Path(image_path).is_file():
        raise FileNotFoundError(f"query picture {image_path} does not exist")
    index = read_index(index_dir)
    meta = index["meta"]
    if run is None:
        run = load_run(meta["run"], meta["checkpoint_tag"])
    query = encode_query(run, text=text, image_path=image_path)
    if query.shape[0] != meta["dim"]:
        raise ValueError(f"query vector has {query.shape[0]} dims but index {index_dir} has {meta['dim']}")
    targets = index["image_vectors"] if text is not None else index["caption_vectors"]
    scores = targets @ query
    top = np.argsort(-scores, kind="stable")[:k]
    hits = []
    for rank, row in enumerate(top.tolist()):
        hit = {"rank": rank + 1, "score": float(scores[row]), "row": row}
        if text is not None:
            hit["image_id"] = index["images"][row]
        else:
            caption = index["captions"][row]
            hit.update(caption=caption["text"], image_row=caption["image_row"],
                       image_id=index["images"][caption["image_row"]])
        hits.append(hit)
    return hits


def format_hits(hits: list[dict]) -> str:
    lines = []
    for h in hits:
        label = f"{h['image_id']}" + (f"  {h['caption']!r}" if "caption" in h else "")
        lines.append(f"{h['rank']:3d}  {h['score']:+.4f}  {label}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from trainer.config import ConfigError
    from trainer.distributed import shutdown

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    exp = sub.add_parser("export", help="embed a split with a run's checkpoint into an index folder")
    add_checkpoint_arguments(exp)
    exp.add_argument("--out", required=True, help="index folder to write")
    qry = sub.add_parser("query", help="rank an index's pictures for a text, or its captions for a picture")
    qry.add_argument("--index", required=True, help="index folder written by `export`")
    what = qry.add_mutually_exclusive_group(required=True)
    what.add_argument("--text", help="a caption: ranks the index's pictures")
    what.add_argument("--image", help="a picture file: ranks the index's captions")
    qry.add_argument("--k", type=int, default=5, help="how many results")
    args = parser.parse_args(argv)
    try:
        if args.command == "export":
            meta = export_index(args.run, args.out, args.split, args.checkpoint)
            print(f"{meta['split']} split of {meta['checkpoint']}: {meta['counts']['images']} images, "
                  f"{meta['counts']['captions']} captions, {meta['dim']} dims, written to {args.out}")
        else:
            hits = query_index(args.index, text=args.text, image_path=args.image, k=args.k)
            query, side = (repr(args.text), "images") if args.text is not None else (args.image, "captions")
            print(f"top {len(hits)} {side} for {query} (rank, score, image id[, caption]):\n{format_hits(hits)}")
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
