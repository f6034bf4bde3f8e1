"""The code of `python -m trainer.retrieve`: export shard sets to a FAISS index folder, query it, serve a search
page (the commands, their examples and help: trainer/retrieval/retrieve_args.py)."""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from shards.remote import is_url
from trainer.config import ConfigError, check_output_folder, load_run_config
from trainer.data.shardset import ShardSet
from trainer.distributed import broadcast_object, is_active, shutdown
from trainer.engine.checkpoint import CheckpointError, find, refuse_sharded_weights_elsewhere
from trainer.eval.concat_weight import describe
from trainer.eval.evaluation import EmbedOptions, load_run
from trainer.models.configs import share_of_weight
from trainer.retrieval.answers import format_answer, search
from trainer.retrieval.faiss_index import KINDS
from trainer.retrieval.index_folder import FILES, RetrievalIndex, assemble
from trainer.retrieval.pieces import PIECES, embed_pieces, plan_pieces
from trainer.retrieval.query import QueryEncoder, QueryError, check_text, decode_query_picture, read_picture_file
from trainer.retrieval.retrieve_args import PROG, build_parser
from trainer.retrieval.server import create_app, run_server
from trainer.training.factory import build_tokenizer
from usercli import OutputExists, cli_main, one_line


def _export_files(out: Path) -> list[Path]:
    """What an export wrote in `out`, refused (before the model is loaded) when neither option says what to do.
    As `shards build`: an existing export is finished with --resume or replaced with --overwrite, never mixed."""
    check_output_folder("--out", out)  # a file, a device, a path under a file: refused, naming a folder instead
    return [out / name for name in (*FILES, PIECES, "export.options.json") if (out / name).exists()]


def check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    if _export_files(out) and not (resume or overwrite):
        raise OutputExists(f"--out {out} already holds an index export; add --resume to finish it or "
                           f"--overwrite to start again")


def prepare_out_dir(out: Path, overwrite: bool) -> None:
    if overwrite:
        for path in _export_files(out):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _check_record(out: Path, record: dict, resume: bool) -> None:
    """The export's options, kept beside its pieces: a resumed export with other options is refused (its pieces
    would mix two models or two corpora)."""
    path = out / "export.options.json"
    if resume and path.is_file():
        before = json.loads(path.read_text())
        changed = sorted(k for k in record if before.get(k) != record[k])
        if changed:
            raise ValueError(f"--resume: {', '.join(changed)} differ from those of the export in --out ({path}); "
                             f"resume with the same run, checkpoint, shard sets and split, or use --overwrite")
    path.write_text(json.dumps(record, indent=2))


def check_export_checkpoint(run_dir: Path, checkpoint: str) -> None:
    """Refuses a missing checkpoint, or a ZeRO-3 one written by another world size (its weights are sharded by
    rank), before the process group starts (load_run checks again). Not trainer.engine.checkpoint's
    world-size check of a resumed run, which may convert a checkpoint instead."""
    try:
        tag, marker = find(run_dir / "checkpoints", checkpoint)
    except CheckpointError as e:  # worded for training's run.resume; here the option is --checkpoint
        raise CheckpointError(str(e).replace("run.resume=", "--checkpoint ", 1)) from None
    refuse_sharded_weights_elsewhere(run_dir / "checkpoints", tag, marker, int(os.environ.get("WORLD_SIZE", "1")),
                                     "export")


@dataclass(frozen=True)
class ExportOptions:
    """What `export` embeds and how: its options beside --run and --out."""

    split: str | None = None  # default: the run's data.test_split
    checkpoint: str = "latest"  # a tag in RUN/checkpoints, or latest
    shards: tuple[str, ...] = ()  # shard set roots, as data.mix_shards names them; () = the run's data.shards
    kind: str = "flat"  # index type, one of trainer.retrieval.faiss_index.KINDS
    resume: bool = False  # finish an interrupted export in the folder
    overwrite: bool = False  # replace an export in the folder
    batch_size: int | None = None  # pictures per forward; None = data.eval_batch_size


def export_index(run_dir: str | Path, out_dir: str | Path, options: ExportOptions = ExportOptions()) -> dict:
    """Embed options.split of the shard sets (default: the run's data.shards) on every rank into pieces, then build
    the FAISS indexes on rank 0; returns index.json (on every rank). Leaves the process group up."""
    if options.kind not in KINDS:
        raise ValueError(f"--index-type must be one of {', '.join(KINDS)}, got {options.kind!r}")
    run_dir, out = Path(run_dir).resolve(), Path(out_dir)
    check_out_dir(out, options.resume, options.overwrite)  # every rank, before the model is loaded
    sets = [_open_set(root) for root in options.shards]  # an unreadable one refused before the checkpoint is read
    check_export_checkpoint(run_dir, options.checkpoint)
    run = load_run(run_dir, options.checkpoint)
    cfg, info = run.cfg, run.info
    split = options.split or cfg.data.test_split
    sets = sets or [run.shardset]
    plan = plan_pieces(sets, split)
    record = {"run": str(run_dir), "checkpoint": run.load_path, "split": split, "sets": [str(s.root) for s in sets]}
    if run.model.local_space:  # pieces of two mixes would not score alike
        record["local_share"] = run.model.local_share
    if info.is_main:
        prepare_out_dir(out, options.overwrite)
        _check_record(out, record, options.resume)
    broadcast_object(None)  # the others wait until rank 0 has prepared (or refused) the folder
    embed_pieces(run.model, sets, plan, out, EmbedOptions.from_config(cfg, run.shardset.vocab, options.batch_size),
                 rank=info.rank, world=info.world_size)
    broadcast_object(None)  # every rank's pieces are written
    meta = None
    if info.is_main:
        model = run.model
        meta = assemble(out, plan, {
            "run": str(run_dir), "config": str(run_dir / "config.yaml"), "checkpoint": run.load_path,
            "checkpoint_tag": Path(run.load_path).parent.name, "step": run.step, "split": split,
            "sets": record["sets"], **(describe(model.local_share) if model.local_space else {}),
            "dim": model.embed_dim * (2 if model.local_space else 1)}, options.kind)
    return broadcast_object(meta)


def _open_set(root: str) -> ShardSet:
    """A --shards set of export, opened; an unreadable one (or one linking out of its folder) refused naming it."""
    try:
        return ShardSet.open(root if is_url(root) else Path(root).resolve())
    except ValueError as e:
        raise ConfigError(f"--shards {root}: {e}; give a shard set built by `python -m shards build`") from e


def open_index(index_dir: str | Path):
    """The opened index, its run's config and caption tokenizer: enough to check queries without the model."""
    index = RetrievalIndex(index_dir)
    config = Path(index.meta["config"])
    if not config.is_file():
        raise FileNotFoundError(f"{config}, the run config named by {index.folder / 'index.json'}, does not exist")
    cfg = load_run_config(config, [])  # the run's own config.yaml: read through renamed keys
    return index, cfg, build_tokenizer(cfg, ShardSet.open(cfg.data.shards).vocab)


def load_encoder(index, tokenizer):
    """The query encoder of the index's checkpoint (the model, loaded once for the whole session). Queries mix the
    spaces with the share the index was built with, whatever the run has recorded since."""
    run = load_run(index.meta["run"], index.meta["checkpoint_tag"])
    share = index_share(index.meta)
    if share is not None and run.model.local_space:
        run.model.local_share = share
    return QueryEncoder(run, tokenizer)


def index_share(meta: dict) -> float | None:
    """The local share an index.json says its vectors were built with: local_share, or the fixed
    local_score_weight of an index written before the share was recorded (None: global vectors only)."""
    if "local_share" in meta:
        return float(meta["local_share"])
    weight = meta.get("local_score_weight")
    return None if weight is None else share_of_weight(float(weight))


def _check_queries(args, cfg, tokenizer) -> tuple[list[tuple[str, str, bytes | None]], int]:
    """The --text/--image queries that can be answered, checked before the model is loaded (a refused one is
    reported on one line), and how many were refused."""
    good, refused = [], 0
    for kind, value in [("text", t) for t in args.text or []] + [("image", p) for p in args.image or []]:
        try:
            if kind == "text":
                check_text(tokenizer, value)
                good.append((kind, value, None))
            else:
                data = read_picture_file(value)
                decode_query_picture(data, value, cfg.data.image_size, cfg.data.max_image_pixels)
                good.append((kind, value, data))
        except QueryError as e:
            refused += 1
            print(f"error: {e}", file=sys.stderr, flush=True)
    return good, refused


def run_queries(args) -> int:
    """Answer --text/--image values, then stdin lines with --interactive, with one loaded model."""
    index, cfg, tokenizer = open_index(args.index)
    queries, refused = _check_queries(args, cfg, tokenizer)
    if not queries and not args.interactive:
        return 2
    encoder = load_encoder(index, tokenizer)

    def answer(kind: str, value: str, data: bytes | None = None) -> bool:
        try:
            if kind == "text":
                result = search(index, encoder, text=value, find=args.find, k=args.k)
            else:
                data = read_picture_file(value) if data is None else data
                result = search(index, encoder, picture=data, name=value, find=args.find, k=args.k)
        except QueryError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            return False
        print(json.dumps(result) if args.json else format_answer(result), flush=True)
        return True

    for query in queries:
        answer(*query)
    if args.interactive:
        if sys.stdin.isatty():
            print("one caption per line (a line 'image: FILE' is a picture query); Ctrl-D ends", file=sys.stderr)
        for line in sys.stdin:
            line = line.rstrip("\n")
            if line.startswith("image:"):
                answer("image", line[len("image:"):].strip())
            elif line.strip():
                answer("text", line)
        return 0  # in a session a refused line is answered in place and the session goes on
    return 2 if refused else 0


def serve(args) -> int:
    index, _, tokenizer = open_index(args.index)
    encoder = load_encoder(index, tokenizer)
    app = create_app(index, encoder, max_query_chars=args.max_query_chars, max_upload_bytes=args.max_upload_mb << 20)
    run_server(app, args.host, args.port)
    return 0


def _main(argv: list[str] | None = None) -> int:
    ours = not is_active()  # the process group this command starts is its to end (a caller's stays up)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "query":
        if not (args.text or args.image or args.interactive):
            parser.error("query: give --text, --image (either may repeat) or --interactive")
    try:
        if args.command == "export":
            meta = export_index(args.run, args.out, ExportOptions(
                split=args.split, checkpoint=args.checkpoint, shards=tuple(args.shards or ()), kind=args.index_type,
                resume=args.resume, overwrite=args.overwrite, batch_size=args.batch_size))
            counts = meta["counts"]
            recall = {s: p["recall_at_10"] for s, p in meta["index"].items() if "recall_at_10" in p}
            print(f"{meta['split']} split of {len(meta['sets'])} shard set(s), checkpoint {meta['checkpoint_tag']}: "
                  f"{counts['images']} pictures, {counts['captions']} captions ({counts['skipped']} bad samples "
                  f"skipped), {meta['dim']} dims, {meta['index']['images']['type']} index written to {args.out}"
                  + (f"; recall@10 against exact: {recall}" if recall else ""))
            return 0
        return run_queries(args) if args.command == "query" else serve(args)
    except (ConfigError, FileNotFoundError, FileExistsError, ValueError) as e:  # QueryError is a ValueError
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if ours:
            shutdown()


def main(argv: list[str] | None = None) -> int:
    """Interrupts and unreadable files end in one line too (shards.cli's contract, as every entry point)."""
    return cli_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
