"""Checkpoints that are complete or absent, found again at resume; the last K kept; a run folder owned by its run.

A checkpoint is the folder CKPT_DIR/step0000120 written by DeepSpeed on every rank (model, optimizer and
scheduler states, plus our client state). It counts only once rank 0 has written its marker, complete.json,
listing every file with its size, after a barrier that all ranks reach only when their own files are written.
`latest` (the name DeepSpeed reads) moves after the marker, by an atomic rename. A run killed while writing
therefore leaves a folder without a marker, and `latest` still names the previous complete checkpoint.

At resume the candidate (`latest`, or the tag asked for) is checked against its marker: a missing marker, a
missing file or a file of another size (truncated) is reported naming the file, and with --resume latest the
previous complete checkpoint is used instead. Checkpoints are ordered by their step number (never by name), and
retention never deletes the one just written, so `latest` never names a deleted folder.

A run folder belongs to its run: a fresh run (no --resume) into a run.out_dir that holds checkpoints is refused
before any work, with the way out (`--resume latest`, another run.out_dir, or `--overwrite`, which moves the
earlier run's outputs aside into RUN/replaced-TIME/; nothing is deleted).

On another world size than the checkpoint's (a job back with 8 nodes instead of 16), `--resume` converts it
(trainer.universal): ZeRO partitions the fp32 weights and the Adam moments by rank, so rank 0 turns CKPT/stepNNN
into DeepSpeed's universal checkpoint CKPT/universal/stepNNN (every parameter whole: fp32 value, exp_avg,
exp_avg_sq, step), the other ranks wait, and the engine, built with "checkpoint": {"load_universal": true},
loads it: weights, Adam moments and step counts, per-group hyperparameters, LR schedule and client state are
those of the checkpoint. A conversion is redone when its own marker is missing (killed); `python -m
trainer.universal --run RUN` converts beforehand. Without ZeRO (stage 0) the optimizer state is whole in one
file and loads on any world size as it is. The data position maps as trainer.train.restored_state says: every
rank starts the virtual epoch after the furthest one any rank of the writing run had begun (the rest of that
epoch is not trained); the global batch is data.batch_size x the new world size x engine.grad_accum.
Refused, before any work, with the way out: another ZeRO stage than the checkpoint's, and optimizer or parameter
state offloaded to NVMe (DeepSpeed's universal load does not restore its swap files). The way out:
    python -m trainer.export --run RUN --out model.pt
    python -m trainer.train --config CONFIG model.init_from=model.pt run.out_dir=NEW_RUN
(weights only: the optimizer state starts afresh).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
import zipfile
from pathlib import Path

import torch

from trainer.config import ConfigError
from trainer.distributed import barrier, broadcast_object

log = logging.getLogger(__name__)

MARKER = "complete.json"
UNIVERSAL = "universal"  # CKPT/universal/TAG: a checkpoint converted for another world size (trainer.universal)
LATEST = "latest"
TAG_PATTERN = re.compile(r"step(\d+)")
# What a run writes into run.out_dir besides config.yaml (rewritten by every start): what --overwrite moves aside.
RUN_OUTPUTS = ("checkpoints", "tb", "eval", "train_log.jsonl")


class CheckpointError(ConfigError):
    """No usable checkpoint, or one this run cannot load; the message names the file and what to do."""


def tag_for(step: int) -> str:
    return f"step{step:07d}"


def atomic_write(path: Path, text: str) -> None:
    """Write a text file of the checkpoint folder (its marker, `latest`) under a temporary name, then rename:
    readers see the old content or the new one, never a half-written file."""
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


# what torch's zip writer says when a write fails (a full disk, a file size limit): it raises RuntimeError
_WRITER_FAILED = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


def write_failure(folder: Path, e: BaseException) -> BaseException:
    """A checkpoint write that failed for want of space, as one line naming the folder and the way out; any other
    error as it is (a bug shows its traceback)."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    if not (full or isinstance(e, RuntimeError) and any(m in str(e) for m in _WRITER_FAILED)):
        return e
    why = " ".join(str(e).split())[-160:]
    return CheckpointError(f"{folder}: writing the checkpoint failed ({why}): is there space left on the device? "
                           f"Free some, then go on from the last complete checkpoint with --resume latest, or set "
                           f"another run.out_dir")


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
        atomic_write(folder / MARKER, json.dumps(marker, indent=1))
        atomic_write(ckpt_dir / LATEST, tag)
        prune(ckpt_dir, keep, written=tag)
    barrier()  # nobody reads `latest` or goes on to a next save before it moved
    return folder


def step_of(tag: str) -> int | None:
    """The step number of a checkpoint tag (step0000120 -> 120), None for any other name."""
    match = TAG_PATTERN.fullmatch(tag)
    return int(match.group(1)) if match else None


def _step_tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint folders, oldest first by step number (a name sort puts step10000000 before step9999999)."""
    tags = [p.name for p in ckpt_dir.glob("step*") if p.is_dir() and step_of(p.name) is not None]
    return sorted(tags, key=step_of)


def prune(ckpt_dir: Path, keep: int, written: str | None = None) -> None:
    """Keep `written` (the checkpoint just written, which `latest` names) and the newest others up to `keep` complete
    ones in all; drop older complete ones and unfinished writes older than the newest kept. A folder of another run
    with higher step numbers (a copied run folder) therefore never costs the checkpoint just written."""
    complete = [t for t in _step_tags(ckpt_dir) if (ckpt_dir / t / MARKER).is_file()]
    if not complete:
        return
    others = [t for t in complete if t != written]
    kept = ({written} if written else set()) | set(others[max(0, len(others) - keep + (1 if written else 0)):])
    newest = max(step_of(t) for t in kept)
    for tag in _step_tags(ckpt_dir):
        if tag not in kept and step_of(tag) < newest:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
    _prune_conversions(ckpt_dir)


def _prune_conversions(ckpt_dir: Path) -> None:
    """Drop universal conversions (CKPT/universal/TAG, trainer.universal) whose source checkpoint is gone."""
    folder = Path(ckpt_dir) / UNIVERSAL
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.is_dir() and not (Path(ckpt_dir) / path.name).is_dir():
            shutil.rmtree(path, ignore_errors=True)
            (folder / f".{path.name}.log").unlink(missing_ok=True)


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


def unreadable_file(folder: Path) -> str | None:
    """Why a complete checkpoint's files cannot be loaded (naming the file), or None. torch.save writes zip
    archives: one whose central directory does not open was overwritten or cut after the marker was written
    (DeepSpeed's loader would fail with a bare `PytorchStreamReader failed reading zip archive`)."""
    for path in sorted(folder.rglob("*.pt")):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return f"{path} is not a readable checkpoint file ({e})"
    return None


def find_readable(ckpt_dir: Path, wanted: str, option: str) -> tuple[str, dict]:
    """`find`, then the chosen checkpoint's files opened as the zip archives torch.save writes: what evaluation
    and export check before DeepSpeed or torch.load see a damaged file."""
    tag, marker = find(ckpt_dir, wanted, option)
    why = unreadable_file(Path(ckpt_dir) / tag)
    if why is not None:
        others = [t for t in complete_tags(ckpt_dir) if t != tag]
        way_out = f"use another: {option}={others[-1]}" if others else "the run has no other complete checkpoint"
        raise CheckpointError(f"{option}={wanted}: {why}; {way_out}")
    return tag, marker


def refuse_sharded_weights_elsewhere(ckpt_dir: Path, tag: str, marker: dict, world_size: int, verb: str) -> None:
    """A ZeRO-3 checkpoint holds each rank's partition of the weights: loaded for inference on another number of
    ranks, DeepSpeed waits forever in a collective. Evaluation and export refuse it before any rank waits."""
    saved = marker.get("world_size")
    if marker.get("zero_stage") == 3 and saved is not None and saved != world_size:
        raise CheckpointError(f"{Path(ckpt_dir) / tag} is a ZeRO-3 checkpoint of {saved} rank(s); {verb} it on "
                              f"{saved} rank(s) (this launch has {world_size})")


def read_marker(folder: Path) -> dict:
    return json.loads((folder / MARKER).read_text())


def complete_tags(ckpt_dir: Path) -> list[str]:
    """The tags of the complete, readable checkpoints, oldest first."""
    return [t for t in _step_tags(Path(ckpt_dir)) if problem(Path(ckpt_dir) / t) is None]


def find(ckpt_dir: Path, wanted: str, option: str = "run.resume") -> tuple[str, dict]:
    """The checkpoint to load for `wanted` ("latest" or a tag) and its marker; `option` names the setting the
    user gave it with, in refusals.

    "latest": the tag named by `latest`, else the newest earlier complete one (each rejected one is logged with
    the reason, naming the file). A named tag: that one or an error that lists the complete ones."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"{option}={wanted}: no complete checkpoint: {ckpt_dir} does not exist, the run "
                              f"wrote none yet (is it the right run folder?)")
    if wanted != "latest":
        why = problem(ckpt_dir / wanted) if wanted.strip() and "/" not in wanted else f"{wanted!r} is not a tag"
        if why is not None:
            others = complete_tags(ckpt_dir)
            way_out = (f"complete checkpoints: {', '.join(others)}, or latest" if others else
                       "the run has no complete checkpoint")
            raise CheckpointError(f"{option}={wanted}: {why}; {way_out}")
        return wanted, read_marker(ckpt_dir / wanted)
    latest_path = ckpt_dir / LATEST
    tags = _step_tags(ckpt_dir)
    named = _read_latest(latest_path)
    reasons = []
    if named is None:
        candidates = list(reversed(tags))
        if latest_path.exists():
            reasons.append((LATEST, f"{latest_path} does not name a checkpoint (not a stepNNNNNNN tag)"))
    else:
        candidates = [named] + [t for t in reversed(tags) if step_of(t) < step_of(named)]
    for tag in candidates:
        why = problem(ckpt_dir / tag)
        if why is None:
            # the passed-over ones are reported when one is used instead; when none is, the error lists them
            for skipped, reason in reasons:
                log.warning("checkpoint %s is unusable: %s", skipped, reason)
            if reasons:
                log.warning("resuming from the previous complete checkpoint %s", ckpt_dir / tag)
            return tag, read_marker(ckpt_dir / tag)
        reasons.append((tag, why))
    detail = "; ".join(why for _, why in reasons) if reasons else "no checkpoint folders"
    raise CheckpointError(f"{option}=latest: no complete checkpoint in {ckpt_dir} ({detail})")


def _read_latest(path: Path) -> str | None:
    """The tag `latest` names, or None when it is absent or holds anything else (binary bytes, a path, text)."""
    try:
        named = path.read_bytes().decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return named if step_of(named) is not None else None


def claim_run_folder(out_dir: Path, overwrite: bool, is_main: bool) -> None:
    """A fresh run (no --resume) may not write into a folder that holds another run's checkpoints: retention,
    `latest`, TensorBoard and eval files of the two would mix. Refused before any work with the way out; with
    `overwrite`, the earlier run's outputs (RUN_OUTPUTS) are moved aside into RUN/replaced-TIME/ instead. Rank 0
    decides and acts; every rank gets its answer, so a refusal is the same on all of them."""
    answer = ""
    if is_main:
        try:
            _claim(Path(out_dir), overwrite)
        except (CheckpointError, OSError) as e:
            answer = str(e)
    answer = broadcast_object(answer)
    if answer:
        raise CheckpointError(answer)


def _claim(out_dir: Path, overwrite: bool) -> None:
    ckpt_dir = out_dir / "checkpoints"
    held = _step_tags(ckpt_dir) if ckpt_dir.is_dir() else []
    if not overwrite:
        if held or (ckpt_dir / LATEST).exists():
            newest = f" (newest {held[-1]})" if held else ""
            raise CheckpointError(
                f"run.out_dir: {out_dir} holds the checkpoints of another run in {ckpt_dir}{newest}; continue it "
                f"with --resume latest, train into another run.out_dir, or pass --overwrite to move its "
                f"{', '.join(RUN_OUTPUTS)} aside into {out_dir}/replaced-TIME/ and start afresh")
        return
    present = [name for name in RUN_OUTPUTS if (out_dir / name).exists()]
    if not present:
        return
    aside = out_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        if not aside.exists():
            break
        aside = out_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    aside.mkdir()
    for name in present:
        os.replace(out_dir / name, aside / name)
    log.warning("--overwrite: the earlier run's %s moved aside into %s (delete it when it is no longer wanted)",
                ", ".join(present), aside)


def _offloaded_to_nvme(ds_config: dict) -> bool:
    zero = ds_config.get("zero_optimization", {})
    return any(zero.get(key, {}).get("device") == "nvme" for key in ("offload_optimizer", "offload_param"))


def check_world_size(ckpt_dir: Path, tag: str, marker: dict, world_size: int, ds_config: dict | None = None) -> str:
    """How this run loads the checkpoint: "same" (its own world size), "plain" (another world size without ZeRO:
    the optimizer state is whole) or "universal" (another world size, ZeRO 1-3: converted first). Where that
    cannot work, refuse before any work and say why and how to go on."""
    written = marker.get("world_size")
    if written == world_size:
        return "same"
    stage = marker.get("zero_stage", 0)
    want = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    why = None
    if ds_config is None:
        why = "no DeepSpeed config to check it against"
    elif stage != want:
        why = (f"it was written with ZeRO stage {stage} and this run uses stage {want} (use the checkpoint's stage: "
               f"engine.deepspeed_config)")
    elif _offloaded_to_nvme(ds_config):
        why = "optimizer or parameter state offloaded to NVMe is not restored by DeepSpeed's universal checkpoint load"
    if why is None:
        return "plain" if stage == 0 else "universal"
    raise CheckpointError(
        f"{Path(ckpt_dir) / tag / MARKER}: checkpoint written by {written} ranks, this run has {world_size}, and it "
        f"cannot be carried over: {why}. Resume with {written} ranks, or export the weights: `python -m "
        f"trainer.export --run RUN --checkpoint {tag} --out model.pt`, then start a new run with "
        f"model.init_from=model.pt (the optimizer state starts afresh)")


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
    """Load a complete checkpoint (model, optimizer, scheduler) into `engine`; its client state. On another world
    size under ZeRO, its universal conversion (trainer.universal.prepare_resume made it and built the engine to load
    it)."""
    marker = read_marker(Path(ckpt_dir) / tag)
    universal = engine.load_universal_checkpoint()
    if marker.get("world_size") != world_size and marker.get("zero_stage", 0) > 0 and not universal:
        raise CheckpointError(f"{Path(ckpt_dir) / tag}: written by {marker.get('world_size')} ranks, this run has "
                              f"{world_size}; the engine must be built with load_universal "
                              "(see trainer.universal.prepare_resume)")
    load_dir = Path(ckpt_dir) / UNIVERSAL if universal else Path(ckpt_dir)
    load_path, client = engine.load_checkpoint(str(load_dir), tag=tag)
    if load_path is None:
        raise CheckpointError(f"run.resume: DeepSpeed could not load {load_dir / tag}")
    if universal and engine.zero_optimization_stage() == 3:
        _mend_zero3_universal_load(engine, load_dir / tag)
    positions = client.get("data_positions", [])
    if is_main and positions and len(positions) != world_size:
        log.warning("data position on %d ranks instead of %d: every rank starts virtual epoch %d from its first "
                    "batch (the furthest epoch any rank had begun was %d; the rest of it is not trained)",
                    world_size, len(positions), max(e for e, _ in positions) + 1, max(e for e, _ in positions))
    return client


def _mend_zero3_universal_load(engine, folder: Path) -> None:
    """Two faults of DeepSpeed's ZeRO-3 universal load (0.19.8), mended: it gives every parameter group the
    settings of the first one (weight decay, learning rate, our "pretrained" flag), so each group's own are put
    back, as saved; and it puts one and the same `step` tensor into every group's Adam state, which torch's
    AdamW then increments in place once per group per step (2 groups: the step count, and with it the bias
    correction, runs twice as fast), so each group gets its own copy."""
    for state in engine.optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    saved = torch.load(folder / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups = saved["param_groups"]
    current = engine.optimizer.param_groups
    if len(groups) != len(current):
        raise CheckpointError(f"{folder}: {len(groups)} parameter groups saved, the optimizer has {len(current)}")
    for group, saved_group in zip(current, groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})


def fp32_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The model's fp32 weights from a complete checkpoint of any ZeRO stage, without a process group."""
    folder = Path(ckpt_dir) / tag
    why = problem(folder) or unreadable_file(folder)
    if why is not None:
        raise CheckpointError(why)
    if read_marker(folder).get("zero_stage", 0) == 0:
        # Without ZeRO the model states file holds the whole module (fp32 unless trained in bf16).
        state = torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        return {k: v.float() for k, v in state["module"].items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return dict(get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag))
