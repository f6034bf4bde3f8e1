"""Checkpoints that are complete or absent, found again at resume; the last K kept.

A checkpoint is the folder CKPT_DIR/step0000120 written by DeepSpeed on every rank (model, optimizer and
scheduler states, plus our client state). It counts only once rank 0 has written its marker, complete.json,
listing every file with its size, after a barrier that all ranks reach only when their own files are written.
`latest` (the name DeepSpeed reads) moves after the marker, by an atomic rename. A run killed while writing
therefore leaves a folder without a marker, and `latest` still names the previous complete checkpoint.

At resume the candidate (`latest`, or the tag asked for) is checked against its marker: a missing marker, a
missing file or a file of another size (truncated) is reported naming the file, and with --resume latest the
previous complete checkpoint is used instead.

A checkpoint is bound to its world size (ZeRO partitions the optimizer state by rank). To continue on another
number of ranks, export the weights and start afresh from them:
    python -m trainer.export --run RUN --out model.pt
    python -m trainer.train --config CONFIG model.init_from=model.pt run.out_dir=NEW_RUN
(or convert with DeepSpeed's universal checkpoint tool, ds_to_universal.py, and load with "load_universal").
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from trainer.distributed import barrier, broadcast_object
from trainer.config import ConfigError

log = logging.getLogger(__name__)

MARKER = "complete.json"
LATEST = "latest"


class CheckpointError(ConfigError):
    """No usable checkpoint, or one this run cannot load; the message names the file and what to do."""


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def _atomic_write(path: Path, text: str) -> None:
    """Readers see the old content or the new one, never a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(engine, ckpt_dir: Path, step: int, client_state: dict, world_size: int, keep: int,
         is_main: bool) -> Path:
    """Every rank writes its part; after a barrier rank 0 writes the marker, moves `latest`, prunes old ones."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    barrier()  # every rank's files are written
    if is_main:
        _fsync_tree(folder)
        files = {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*"))
                 if p.is_file() and p.name != MARKER}
        marker = {"tag": tag, "step": step, "world_size": world_size,
                  "zero_stage": engine.zero_optimization_stage(), "files": files}
        _atomic_write(folder / MARKER, json.dumps(marker, indent=1))
        _atomic_write(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep)
    barrier()  # nobody reads `latest` or goes on to a next save before it moved
    return folder


def _step_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint folders, oldest first."""
    return sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())


def prune(ckpt_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and unfinished writes older than them."""
    complete = [t for t in _step_tags(ckpt_dir) if (ckpt_dir / t / MARKER).is_file()]
    if not complete:
        return
    kept = set(complete[-keep:])
    newest = complete[-1]
    for tag in _step_tags(ckpt_dir):
        if tag not in kept and tag < newest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)


def problem(folder: Path) -> str | None:
    """Why a checkpoint folder cannot be used (naming the file), or None when it is complete."""
    marker_path = folder / MARKER
    if not folder.is_dir():
        return f"{folder} does not exist"
    if not marker_path.is_file():
        return f"{marker_path} is missing: the checkpoint was not completely written"
    try:
        marker = json.loads(marker_path.read_text())
        files = marker["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{marker_path} is unreadable: {e}"
    for name, size in files.items():
        path = folder / name
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path} is truncated or altered: {actual} bytes, {size} when it was written"
    return None


def read_marker(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


def find(ckpt_dir: Path, wanted: str) -> tuple[str, dict]:
    """The checkpoint to load for `wanted` ("latest" or a tag) and its marker.

    "latest": the tag named by `latest`, else the newest earlier complete one (each rejected one is logged with
    the reason, naming the file). A named tag: that one or an error."""
    ckpt_dir = Path(ckpt_dir)
    if wanted != "latest":
        why = problem(ckpt_dir / wanted)
        if why is not None:
            raise CheckpointError(f"run.resume={wanted}: {why}")
        return wanted, read_marker(ckpt_dir / wanted)
    latest_path = ckpt_dir / LATEST
    tags = _step_tags(ckpt_dir)
    if latest_path.is_file():
        named = latest_path.read_text().strip()
        candidates = [named] + [t for t in reversed(tags) if t < named]
    else:
        candidates = list(reversed(tags))
    reasons = []
    for tag in candidates:
        why = problem(ckpt_dir / tag)
        if why is None:
            if reasons:
                log.warning("resuming from the previous complete checkpoint %s", ckpt_dir / tag)
            return tag, read_marker(ckpt_dir / tag)
        log.warning("checkpoint %s is unusable: %s", tag, why)
        reasons.append(why)
    detail = "; ".join(reasons) if reasons else "no checkpoint folders"
    raise CheckpointError(f"run.resume=latest: no complete checkpoint in {ckpt_dir} ({detail})")


def check_world_size(ckpt_dir: Path, tag: str, marker: dict, world_size: int) -> None:
    """ZeRO partitions are per rank: refuse before any work, and say how to convert."""
    written = marker.get("world_size")
    if written != world_size:
        raise CheckpointError(
            f"{Path(ckpt_dir) / tag / MARKER}: checkpoint written by {written} ranks, this run has {world_size}. "
            f"Resume with {written} ranks, or convert: `python -m trainer.export --run RUN --checkpoint {tag} "
            f"--out model.pt`, then start a new run with model.init_from=model.pt (the optimizer state starts "
            f"afresh), or convert with DeepSpeed's ds_to_universal.py and load it as a universal checkpoint")


def find_on_all_ranks(ckpt_dir: Path, wanted: str, is_main: bool) -> tuple[str, dict]:
    """`find` on rank 0, its answer (or its refusal) on every rank: no rank may load another checkpoint (one
    written meanwhile) or be left waiting in a collective while rank 0 reports an error."""
    answer: tuple | str
    if is_main:
        try:
            answer = find(ckpt_dir, wanted)
        except CheckpointError as e:
            answer = str(e)
    else:
        answer = ""
    answer = broadcast_object(answer)
    if isinstance(answer, str):
        raise CheckpointError(answer)
    return answer


def load(engine, ckpt_dir: Path, tag: str, world_size: int, is_main: bool) -> dict:
    """Load a complete checkpoint (model, optimizer, scheduler) into `engine`; its client state."""
    marker = read_marker(Path(ckpt_dir) / tag)
    check_world_size(ckpt_dir, tag, marker, world_size)
    load_path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if load_path is None:
        raise CheckpointError(f"run.resume: DeepSpeed could not load {Path(ckpt_dir) / tag}")
    return client


def fp32_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's fp32 weights from a complete checkpoint of any ZeRO stage, without a process group."""
    folder = Path(ckpt_dir) / tag
    why = problem(folder)
    if why is not None:
        raise CheckpointError(why)
    if read_marker(folder).get("zero_stage", 0) == 0:
        # Without ZeRO the model states file holds the whole module (fp32 unless trained in bf16).
        state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
