"""ZeRO 1-3 checkpoints converted to DeepSpeed's universal format, to resume on another world size: the conversion
(`convert`), the resume on another world size (`prepare_resume`) and `python -m trainer.universal` (what the
format is, when the conversion runs, and the command's help: trainer/engine/universal_args.py)."""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from trainer.distributed import broadcast_object
from trainer.engine.checkpoint import (
    MARKER,
    UNIVERSAL,
    CheckpointError,
    atomic_write,
    check_world_size,
    find,
    problem,
    read_marker,
)
from trainer.engine.universal_args import build_parser

log = logging.getLogger(__name__)

FOLDER = UNIVERSAL  # CKPT/universal/<tag>: beside the step folders, not among them (they are `step*`)


def universal_dir(ckpt_dir: Path) -> Path:
    return Path(ckpt_dir) / FOLDER


def converted(ckpt_dir: Path, tag: str) -> bool:
    """A complete conversion of this very checkpoint exists."""
    folder = universal_dir(ckpt_dir) / tag
    if problem(folder) is not None:
        return False
    try:
        source = read_marker(Path(ckpt_dir) / tag)
        return read_marker(folder).get("source_files") == source["files"]
    except (OSError, ValueError, KeyError):
        return False


def convert(ckpt_dir: Path, tag: str) -> Path:
    """CKPT/tag -> CKPT/universal/tag (no process group needed); the folder. Done again unless complete."""
    ckpt_dir = Path(ckpt_dir)
    source = ckpt_dir / tag
    why = problem(source)
    if why is not None:
        raise CheckpointError(why)
    marker = read_marker(source)
    if marker.get("zero_stage", 0) == 0:
        raise CheckpointError(f"{source}: written without ZeRO (stage 0); its optimizer state is whole already "
                              f"and loads on any world size as it is, no conversion needed")
    out = universal_dir(ckpt_dir) / tag
    if converted(ckpt_dir, tag):
        return out
    shutil.rmtree(out, ignore_errors=True)  # a killed or stale conversion
    out.mkdir(parents=True)
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    args = SimpleNamespace(input_folder=str(source), output_folder=str(out), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True,
                           # Our client state does not carry `universal_checkpoint_info` (DeepSpeed's tool asks for
                           # it; a model without tensor or pipeline parallelism needs only its version key).
                           inject_missing_state=True)
    start = time.perf_counter()
    with (out.parent / f".{tag}.log").open("w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        try:
            ds_to_universal(args)
        except Exception as e:  # noqa: BLE001 - DeepSpeed raises AssertionError, ValueError, RuntimeError...
            raise CheckpointError(f"converting {source} to a universal checkpoint failed ({type(e).__name__}: "
                                  f"{e}); see {out.parent / f'.{tag}.log'}") from e
    seconds = time.perf_counter() - start
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*"))
             if p.is_file() and p.name != MARKER}
    atomic_write(out / MARKER, json.dumps({
        "tag": tag, "step": marker["step"], "source_world_size": marker["world_size"],
        "zero_stage": marker["zero_stage"], "seconds": round(seconds, 3), "files": files,
        "source_files": marker["files"]}, indent=1))
    log.info("converted %s to a universal checkpoint in %s (%.1f s, %d files)", source, out, seconds, len(files))
    return out


def prepare_resume(ckpt_dir: Path, tag: str, marker: dict, world_size: int, ds_config: dict,
                   is_main: bool) -> dict:
    """Before the engine is built: refuse what cannot be resumed here; on another world size under ZeRO, rank 0
    converts the checkpoint to a universal one (unless done already) while the others wait. Returns the
    DeepSpeed config to build the engine with ("load_universal" set when that checkpoint is to be loaded)."""
    mode = check_world_size(ckpt_dir, tag, marker, world_size, ds_config)
    if mode == "same":
        return ds_config
    if is_main:
        log.warning("checkpoint %s was written by %d ranks, this run has %d: %s", Path(ckpt_dir) / tag,
                    marker["world_size"], world_size,
                    "without ZeRO its optimizer state is whole and loads as it is" if mode == "plain" else
                    f"converting it to DeepSpeed's universal checkpoint format "
                    f"({Path(ckpt_dir) / 'universal' / tag}) and loading that: weights, Adam moments and steps, "
                    f"LR schedule carried over")
    if mode == "plain":
        return ds_config
    failure = None
    if is_main:
        try:
            convert(ckpt_dir, tag)
        except CheckpointError as e:
            failure = str(e)
    failure = broadcast_object(failure)  # every rank waits for the conversion, and learns if it failed
    if failure is not None:
        raise CheckpointError(failure)
    return {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ckpt_dir = Path(args.run) / "checkpoints"
    try:
        tag, _ = find(ckpt_dir, args.tag)
        out = convert(ckpt_dir, tag)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{out} (complete; `--resume {tag}` or `--resume latest` on another world size loads it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
