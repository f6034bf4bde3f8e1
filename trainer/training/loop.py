"""The training loop of `python -m trainer.train`: config -> data -> model -> loss -> engine, with evaluation,
checkpoints, fault handling and logging around the steps.

What the command does and its faults, as `--help` shows them: DESCRIPTION in trainer/config/cli_args.py (the
command line lives there, without torch, so that help and the launch scripts' preflight are instant).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from shards.remote import is_pipe, is_url, redact_url
from trainer.config import Config, ConfigError, save_config
from trainer.config import cli_args as train_args
from trainer.data.decode import RegionSpec, check_image_input
from trainer.data.loader import DataWait, StopWhileWaiting, TrainLoader
from trainer.data.samples import BAD_KINDS, BadSampleLimits, TooManyBadSamples
from trainer.data.shardset import ShardSet, check_shards_for_workers, mix_sets
from trainer.distributed import (
    DistInfo,
    PeerLost,
    PeerWatch,
    gather_no_grad,
    init_distributed,
    is_peer_failure,
    shutdown,
)
from trainer.engine import checkpoint, universal
from trainer.engine.build import backbone_lr, build_engine, deepspeed_config
from trainer.eval.concat_weight import exported_share, run_share
from trainer.eval.evaluation import evaluate_split, results_table, write_results
from trainer.loss.hierarchical import HierarchicalLoss
from trainer.models.configs import AUTO_WEIGHT
from trainer.observe.progress import ProgressBar, progress_enabled
from trainer.observe.tblog import RunLogger
from trainer.training.factory import (
    build_loss,
    build_model,
    build_train_stream,
    check_compile_backend,
    compile_encoders,
)
from trainer.training.step import StepAgreement, TrainEngine, grad_cache_step, train_step
from usercli import cli_main

log = logging.getLogger("trainer")


# ---------------------------------------------------------------------------------------------- run state


@dataclass
class RunState:
    """Everything the run counts, saved to and restored from the checkpoint as a whole. The totals are over
    all ranks (every rank holds the same numbers); data_epoch and data_batches are this rank's stream position."""

    step: int = 0
    samples: int = 0
    data_epoch: int = 0
    data_batches: int = 0
    read_total: int = 0
    bad_totals: list[int] = field(default_factory=lambda: [0] * len(BAD_KINDS))
    set_samples: list[int] = field(default_factory=list)
    nonfinite_steps: int = 0
    nonfinite_streak: int = 0

    def advance_data(self, epoch: int) -> None:
        if epoch != self.data_epoch:
            self.data_epoch, self.data_batches = epoch, 0
        self.data_batches += 1

    def totals(self) -> dict:
        """What is the same on every rank (the data position is not)."""
        out = asdict(self)
        out.pop("data_epoch"), out.pop("data_batches")
        return out


def client_state(cfg: Config, state: RunState, positions: list[list[int]]) -> dict:
    """Saved beside DeepSpeed's state. positions: [epoch, batches] of every rank (all-gathered)."""
    return {"run_state": state.totals(), "data_positions": positions, "world_size": len(positions),
            "config": cfg.to_dict(), "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}


def restored_state(saved: dict, rank: int, world: int, num_sets: int) -> RunState:
    """The RunState of a checkpoint's client state for this rank. On the world size it was written with, each
    rank continues its own stream where it stopped. On another world size the streams (shards per rank and
    worker) are not the same ones: every rank starts the virtual epoch after the furthest one any rank had
    begun, so no sample of the interrupted epoch is trained twice (the rest of that epoch is left out)."""
    state = RunState(**saved["run_state"])
    if not state.set_samples:
        state.set_samples = [0] * num_sets
    state.bad_totals = [*state.bad_totals, *[0] * (len(BAD_KINDS) - len(state.bad_totals))]  # from before a new kind
    positions = saved["data_positions"]
    if len(positions) == world:
        state.data_epoch, state.data_batches = positions[rank]
    else:
        state.data_epoch, state.data_batches = max(epoch for epoch, _ in positions) + 1, 0
    return state


# ---------------------------------------------------------------------------------------------- stop request
class StopRequest:
    """Set by SIGTERM / SIGUSR1; the training loop checkpoints and leaves at the next step boundary. While the
    loader waits for data, the wait lasts trainer.data.loader.STOP_GRACE_S more at most (StopWhileWaiting)."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}

    def _handler(self, signum: int, _frame) -> None:
        self.signal = signum

    def requested(self) -> bool:
        return self.signal is not None

    def __enter__(self) -> "StopRequest":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handler)
        pid_dir = os.environ.get("TRAINER_PID_DIR")  # set by launch/*.sh to forward signals to the ranks
        if pid_dir and Path(pid_dir).is_dir():  # a node-local folder: absent on the other nodes
            Path(pid_dir, f"rank{os.environ.get('RANK', '0')}.pid").write_text(str(os.getpid()))
        return self

    def __exit__(self, *_exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class StoppedWithoutCheckpoint(Exception):  # noqa: N818 - a stop request that was obeyed, not a fault
    """A stop request (SIGTERM/SIGUSR1) obeyed while waiting for data, with nothing new to checkpoint: the run
    ends with this one line and exit code 128 + the signal's number, as a process ended by that signal would."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# ---------------------------------------------------------------------------------------------- prepare


@dataclass
class Run:
    """What the phases share: the config, this process's place, the engine and its inputs and outputs."""

    cfg: Config
    info: DistInfo
    shardset: ShardSet
    engine: TrainEngine  # a deepspeed.DeepSpeedEngine
    loss_fn: HierarchicalLoss
    tb: RunLogger
    out_dir: Path
    set_names: list[str]
    regions: RegionSpec | None
    num_params: int
    resume_tag: str | None = None
    batches: TrainLoader | None = None  # the training stream (open_batches): its position goes into checkpoints
    peers: PeerWatch | None = None  # the other ranks' signs of life (more than one process)

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    @property
    def global_batch(self) -> int:
        return self.cfg.data.batch_size * self.info.world_size * self.cfg.engine.grad_accum


def check_inputs(cfg: Config, info: DistInfo) -> tuple[ShardSet, list, RegionSpec | None]:
    """Refuse missing shards, too few shards for the workers and mismatched image inputs before any work."""
    d = cfg.data
    try:
        shardset = ShardSet.open(d.shards)
        shardset.urls(d.train_split)  # refuses missing shard files
        if not d.resampled:
            check_shards_for_workers(len(shardset.split_info(d.train_split)["shards"]), info.world_size,
                                     d.num_workers, d.train_split)
        regions = RegionSpec.from_config(cfg)
        mix = mix_sets(shardset, d.mix_shards, d.mix_weights, d.train_split)
        for one in [shardset] + [s for s, _ in mix[1:]]:
            check_image_input(one, d.train_split, regions)  # pictures vs region features
    except (ValueError, OSError) as e:  # trainer.data's refusals name the file; a ConfigError makes them one line
        raise ConfigError(f"data.shards: {e}") from e
    return shardset, mix, regions


def refuse_before_work(cfg: Config, info: DistInfo) -> tuple[dict, tuple[ShardSet, list, RegionSpec | None]]:
    """The checks of a config that need more than the config itself, made on every rank before any work (no
    collective, nothing written): the DeepSpeed JSON against the batch sizes, the shard sets' inputs, the
    torch.compile backend. (The DeepSpeed config, the inputs of check_inputs.)"""
    ds_config = deepspeed_config(cfg, info.world_size)  # refuses disagreeing batch sizes before any work
    inputs = check_inputs(cfg, info)
    if cfg.engine.compile:
        check_compile_backend(cfg.engine.compile_backend)
    return ds_config, inputs


def prepare(cfg: Config, overwrite: bool = False) -> tuple[Run, list]:
    """Process group, checks, config saved, model and engine built; (run, corpus mix). A fresh run into a folder
    with another run's checkpoints is refused, or with `overwrite` that run's outputs are moved aside first."""
    info = init_distributed(cfg.engine.collective_timeout_s)
    ds_config, (shardset, mix, regions) = refuse_before_work(cfg, info)
    out_dir = Path(cfg.run.out_dir)
    resume_tag = None
    if not cfg.run.resume:
        checkpoint.claim_run_folder(out_dir, overwrite, info.is_main)
    if cfg.run.resume:
        resume_tag, marker = checkpoint.find_on_all_ranks(out_dir / "checkpoints", cfg.run.resume, info.is_main)
        # another world size: refused where impossible, else converted (ZeRO) and loaded as universal checkpoint
        ds_config = universal.prepare_resume(out_dir / "checkpoints", resume_tag, marker, info.world_size,
                                             ds_config, info.is_main)
    configure_device(cfg, info)
    random.seed(cfg.run.seed)
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out_dir / "config.yaml")
    model = build_model(cfg, shardset)
    num_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them away
    if cfg.model.init_from and not cfg.run.resume:
        load_init_weights(model, cfg.model.init_from, keep_share=cfg.model.local_score_weight != AUTO_WEIGHT)
    elif cfg.run.resume and model.local_space:  # the share chosen before the stop (or the fixed one)
        model.local_share = run_share(cfg.model.local_score_weight, out_dir)[0]
    if cfg.engine.compile:
        compile_encoders(model, cfg.engine.compile_backend)
    engine = build_engine(cfg, model, ds_config)
    tb = RunLogger(out_dir / "tb", enabled=info.is_main)
    tb.text("config", f"```\n{cfg.to_yaml()}\n```")
    tb.retrieval_layout(list(dict.fromkeys([cfg.data.eval_split, cfg.data.test_split])))
    set_names = [str(s.root) for s, _ in mix] or [str(shardset.root)]
    run = Run(cfg, info, shardset, engine, build_loss(cfg), tb, out_dir, set_names, regions, num_params,
              resume_tag, peers=PeerWatch(info.rank, info.world_size) if info.world_size > 1 else None)
    return run, mix


def restore(run: Run) -> RunState:
    """A fresh RunState, or the checkpoint's (DeepSpeed state loaded; another world size through DeepSpeed's
    universal checkpoint, optimizer state included)."""
    if run.resume_tag is None:
        return RunState(set_samples=[0] * len(run.set_names))
    saved = checkpoint.load(run.engine, run.ckpt_dir, run.resume_tag, run.info.world_size, run.info.is_main)
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])
    state = restored_state(saved, run.info.rank, run.info.world_size, len(run.set_names))
    log.info("resumed from %s at step %d (%d samples seen)", run.ckpt_dir / run.resume_tag, state.step,
             state.samples)
    return state


def data_state_file(folder: Path, rank: int) -> Path:
    """This rank's training-stream position in a checkpoint folder (per rank: each rank's workers have their own
    streams, too large to all-gather; listed and size-checked by the checkpoint's marker like DeepSpeed's files)."""
    return folder / f"data_rank{rank:05d}.pt"


def saved_stream(run: Run) -> dict | None:
    """The checkpoint's stream position of this rank, or None when there is none to continue (a fresh run, another
    world size, a checkpoint written before positions were saved)."""
    if run.resume_tag is None:
        return None
    path = data_state_file(run.ckpt_dir / run.resume_tag, run.info.rank)
    if checkpoint.read_marker(run.ckpt_dir / run.resume_tag).get("world_size") != run.info.world_size:
        return None
    if not path.is_file():
        log.warning("%s is missing: the data stream starts afresh at the next epoch", path)
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def warn_unbounded_reads(d) -> bool:
    """data.num_workers=0 reads shards in the main process, where no DataWait bounds a batch: a URL or `pipe:` read
    is still bounded (data.shard_timeout per wait, data.shard_retries), a local file's read that stalls (a hung
    network file system) cannot be interrupted from the process doing it. Says so once at start; True if it did."""
    local = [s for s in (d.shards, *d.mix_shards) if not (is_url(s) or is_pipe(s))]
    if d.num_workers == 0 and local:
        log.warning("data.num_workers=0: shards are read in the main process, where a stalled read of a local file "
                    "(%s) is not bounded by data.batch_timeout_s; set data.num_workers>=1 for that bound",
                    local[0])
    return d.num_workers == 0 and bool(local)


def open_batches(run: Run, mix: list, state: RunState, stop: StopRequest) -> TrainLoader:
    """One training stream for the whole run, continued exactly from the checkpoint's position when it has one
    for this world size and worker count; otherwise fresh streams from the next epoch (none of the interrupted
    epoch's remaining batches are then trained). Its workers stop on too many bad samples of their own
    (data.max_bad_fraction past data.bad_fraction_min_read), and each batch is waited for data.batch_timeout_s at
    most, and at most a short grace once `stop` is requested."""
    stream = build_train_stream(run.cfg, run.shardset, rank=run.info.rank, world_size=run.info.world_size,
                                mix=mix)
    d = run.cfg.data
    workers = d.num_workers
    warn_unbounded_reads(d)
    limits = BadSampleLimits(max_fraction=d.max_bad_fraction, min_read=d.bad_fraction_min_read)
    wait = DataWait(timeout_s=d.batch_timeout_s, stop_requested=stop.requested)
    saved = saved_stream(run)
    if saved is not None:
        run.batches = TrainLoader(stream, workers, limits=limits, wait=wait)
        try:
            run.batches.load_state_dict(saved)
            return run.batches
        except ValueError as e:  # another data.num_workers than the checkpoint's
            log.warning("%s: the data stream starts afresh at the next epoch", e)
    if state.data_batches > 0:
        state.data_epoch, state.data_batches = state.data_epoch + 1, 0
    run.batches = TrainLoader(stream, workers, start_epoch=state.data_epoch, limits=limits, wait=wait)
    return run.batches


def announce(run: Run, mix: list) -> None:
    cfg, info = run.cfg, run.info
    if not info.is_main:
        return
    if mix:
        log.info("mixing %d shard sets: %s", len(mix),
                 ", ".join(f"{name} {w:.1%}" for name, (_, w) in zip(run.set_names, mix)))
    log.info("training %d steps, global batch %d (%d ranks x %d x accum %d), %.2fM parameters, %s",
             cfg.train.steps, run.global_batch, info.world_size, cfg.data.batch_size, cfg.engine.grad_accum,
             run.num_params / 1e6, cfg.engine.precision)


# ---------------------------------------------------------------------------------------------- step


@dataclass
class LogWindow:
    """Sums between two log lines."""

    sums: dict = field(default_factory=dict)
    micro: int = 0
    updates: int = 0
    data_wait: float = 0.0
    start: float = field(default_factory=time.perf_counter)
    grad_norm: torch.Tensor | None = None
    skipped: bool = False


def step_once(run: Run, state: RunState, batches: TrainLoader, stop: StopRequest, window: LogWindow) -> bool:
    """One optimizer step of engine.grad_accum micro-steps; True when some rank asked to stop. The counts of
    this step (samples read, bad per kind, samples per mixed set) and the stop flag ride on the step's one
    all-reduce, inside train_step, as a StepAgreement."""
    cfg = run.cfg
    mine = StepAgreement.zeros(len(run.set_names))
    step_sums: dict[str, torch.Tensor] = {}
    log_now = (state.step + 1) % cfg.train.log_every == 0 or state.step + 1 == cfg.train.steps
    run.engine.module.set_backbone_grad(state.step >= cfg.optim.backbone_freeze_steps)
    cached: list[dict] = []  # engine.grad_cache: the step's micro-batches, all scored at the last one
    for micro in range(cfg.engine.grad_accum):
        t0 = time.perf_counter()
        epoch, batch = next(batches)
        state.advance_data(epoch)
        window.data_wait += time.perf_counter() - t0
        mine.add_batch(batch)
        last = micro == cfg.engine.grad_accum - 1
        if last:
            mine.stop = int(stop.signal is not None)
        window.micro += 1
        if cfg.engine.grad_cache:
            cached.append(batch)
            if not last:
                continue
            stats = grad_cache_step(run.engine, run.loss_fn, cached, state.step, run.info, want_grad_norm=log_now,
                                    agreement=mine)
        else:
            stats = train_step(run.engine, run.loss_fn, batch, state.step, run.info, want_grad_norm=log_now,
                               agreement=mine if last else None)
        # one loss per micro-step, or with grad_cache one for the step: the log divides by micro-steps
        weight = cfg.engine.grad_accum if cfg.engine.grad_cache else 1
        for k, v in stats.items():
            if k not in ("skipped", "agreed", "grad_norm"):
                step_sums[k] = step_sums.get(k, 0.0) + weight * v
    agreed: StepAgreement = stats["agreed"]
    state.step += 1
    state.samples += run.global_batch
    state.read_total += agreed.samples_read
    state.bad_totals = [a + b for a, b in zip(state.bad_totals, agreed.bad_counts)]
    state.set_samples = [a + b for a, b in zip(state.set_samples, agreed.set_counts)]
    window.grad_norm, window.skipped = stats.get("grad_norm"), bool(stats["skipped"])
    count_update(run, state, window, step_sums)
    return agreed.stop > 0


def count_update(run: Run, state: RunState, window: LogWindow, step_sums: dict) -> None:
    if window.skipped:
        state.nonfinite_steps += 1
        state.nonfinite_streak += 1
        if run.info.is_main:
            log.warning("step %d: non-finite loss or gradient on some rank; update skipped on every rank "
                        "(%d in a row, %d in all)", state.step, state.nonfinite_streak, state.nonfinite_steps)
        return
    state.nonfinite_streak = 0
    window.updates += 1
    for k, v in step_sums.items():
        window.sums[k] = window.sums.get(k, 0.0) + v


def check_health(run: Run, state: RunState) -> None:
    """Stop the run (an error on every rank alike: the totals are agreed) on too many bad samples or skips."""
    d, cfg = run.cfg.data, run.cfg
    bad = sum(state.bad_totals)
    if state.read_total >= d.bad_fraction_min_read and bad > d.max_bad_fraction * state.read_total:
        counts = ", ".join(f"{kind} {n}" for kind, n in zip(BAD_KINDS, state.bad_totals) if n)
        raise TooManyBadSamples(f"data.shards: {bad} of {state.read_total} samples read were bad "
                                f"({bad / state.read_total:.2%} > data.max_bad_fraction={d.max_bad_fraction}; "
                                f"{counts}); see the warnings above, check the set with `python -m shards check`, "
                                f"or raise data.max_bad_fraction")
    if state.nonfinite_streak >= cfg.train.max_nonfinite_steps:
        raise RuntimeError(f"{state.nonfinite_streak} steps in a row had a non-finite loss or gradient "
                           f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}), up to step {state.step}; "
                           f"the last checkpoint written before them is kept in {run.ckpt_dir}")


# ---------------------------------------------------------------------------------------------- log


def window_scalars(run: Run, state: RunState, window: LogWindow) -> dict:
    cfg, engine = run.cfg, run.engine
    elapsed = time.perf_counter() - window.start
    per_update = max(1, window.updates * cfg.engine.grad_accum)
    scalars = {f"loss/{k}": float(v) / per_update for k, v in window.sums.items()}
    grad_norm = window.grad_norm
    if grad_norm is None and not window.skipped:
        grad_norm = engine.get_global_grad_norm()
    scalars.update({
        "train/lr": engine.get_lr()[0],
        "train/samples_per_s": run.global_batch / cfg.engine.grad_accum * window.micro / elapsed,
        "train/data_wait_frac": window.data_wait / elapsed,
        "train/step_s": elapsed / (window.micro / cfg.engine.grad_accum),
        "train/bad_samples": sum(state.bad_totals),
        "train/data_epoch": state.data_epoch,
        "train/nonfinite_steps": state.nonfinite_steps,
    })
    scalars.update({f"data/bad/{kind}": n for kind, n in zip(BAD_KINDS, state.bad_totals)})
    if len(run.set_names) > 1:  # how many training samples each corpus contributed so far
        scalars.update({f"data/samples/{Path(name).name}": n for name, n in zip(run.set_names, state.set_samples)})
    if grad_norm is not None:
        scalars["train/grad_norm"] = float(grad_norm)
    if (rate := backbone_lr(engine)) is not None:
        scalars["train/backbone_lr"] = rate
    if torch.cuda.is_available():
        scalars["train/max_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return scalars


def log_window(run: Run, state: RunState, window: LogWindow, bar: ProgressBar) -> None:
    scalars = window_scalars(run, state, window)
    run.tb.scalars(state.step, scalars)
    if run.info.is_main:
        steps = run.cfg.train.steps
        left_s = (steps - state.step) * scalars["train/step_s"]
        log.info("step %d/%d loss %.4f (global %.4f local %.4f) lr %.2e %.0f samples/s data wait %.0f%% "
                 "eta %dm%02ds", state.step, steps, scalars.get("loss/loss", math.nan),
                 scalars.get("loss/global", math.nan), scalars.get("loss/local", math.nan), scalars["train/lr"],
                 scalars["train/samples_per_s"], 100 * scalars["train/data_wait_frac"], left_s // 60, left_s % 60)
        bar.update(0, loss=f"{scalars.get('loss/loss', math.nan):.4f}")
        with (run.out_dir / "train_log.jsonl").open("a") as f:
            f.write(json.dumps({"step": state.step, **scalars}) + "\n")


# ---------------------------------------------------------------------------------------------- evaluate, save


def evaluate(run: Run, split: str, step: int, examples: bool) -> dict:
    """Every rank embeds its share; rank 0 scores, logs and writes RUN/eval/<split>.json; all get the results."""
    def on_embeddings(emb: dict) -> None:  # retrieval examples + projector, on rank 0 (it has the embeddings)
        if examples and run.regions is None:  # feature shard sets hold no pictures to show
            run.tb.eval_examples(step, emb, run.shardset, split, run.engine.module.local_share)

    results = evaluate_split(run.engine.module, run.shardset, split, run.cfg, run.info, on_embeddings=on_embeddings)
    run.tb.retrieval(step, split, results)
    if "concat_weight" in results:  # the concatenation's local share: chosen on validation, or the run's
        run.tb.scalars(step, {f"eval_{split}/concat/local_share": results["concat_weight"]["local_share"]})
    if run.info.is_main:
        write_results(results, run.out_dir, split, step)
    return results


def save_checkpoint(run: Run, state: RunState) -> None:
    positions = gather_no_grad(torch.tensor([[state.data_epoch, state.data_batches]], dtype=torch.long)).tolist()
    folder = run.ckpt_dir / checkpoint.tag_for(state.step)
    try:
        folder.mkdir(parents=True, exist_ok=True)  # written before DeepSpeed's files, so the marker lists it
        torch.save(run.batches.state_dict(), data_state_file(folder, run.info.rank))
        checkpoint.save(run.engine, run.ckpt_dir, state.step, client_state(run.cfg, state, positions),
                        run.info.world_size, run.cfg.train.keep_checkpoints, run.info.is_main)
    except (OSError, RuntimeError) as e:  # a full disk: one line naming the folder (anything else: as it is)
        failure = checkpoint.write_failure(folder, e)
        if failure is e:
            raise
        raise failure from e


def final_evaluation(run: Run, state: RunState) -> dict:
    d = run.cfg.data
    final = {}
    for split in dict.fromkeys([d.eval_split, d.test_split]):
        final[split] = results = evaluate(run, split, state.step, examples=split == d.eval_split)
        if run.info.is_main:
            print(f"\n{split} split after {state.step} steps ({results['counts']['images']} images, "
                  f"{results['counts']['captions']} captions):\n{results_table(results)}\n"
                  f"(written to {run.out_dir / 'eval' / f'{split}.json'})", flush=True)
    run.tb.hparams(run.cfg.to_dict(), final[d.test_split], d.test_split)
    return final


# ---------------------------------------------------------------------------------------------- the loop


def train(cfg: Config, overwrite: bool = False) -> dict:
    """Train as configured; {split: results} at the end (on every rank), or {"preempted": {"step", "signal"}}
    after a stop request (SIGTERM/SIGUSR1), whose handlers are in place from the start. overwrite: --overwrite
    (trainer.engine.checkpoint.claim_run_folder)."""
    with StopRequest() as stop:
        run, mix = prepare(cfg, overwrite)
        state = restore(run)
        try:
            return train_loop(run, state, open_batches(run, mix, state, stop), stop, mix)
        except RuntimeError as e:
            if run.peers is None or not is_peer_failure(e):
                raise
            raise peer_lost(run, e) from e
        finally:
            if run.batches is not None:
                run.batches.close()  # the loader's workers live for the whole run; they end here
            if run.peers is not None:
                run.peers.close()
            run.tb.close()


def peer_lost(run: Run, error: RuntimeError) -> PeerLost:
    """The one line for a collective that another rank did not come to, naming that rank."""
    what = ("did not complete within engine.collective_timeout_s="
            f"{run.cfg.engine.collective_timeout_s:g} s" if "Timed out" in str(error) else "lost a peer's connection")
    kept = (f"the last complete checkpoint in {run.ckpt_dir} is kept: once every rank's node is sound, continue "
            "with --resume latest" if (run.ckpt_dir / "latest").is_file() else "no checkpoint was written yet")
    return PeerLost(f"rank {run.info.rank}: a collective of step {run.peers.step} {what}: {run.peers.missing()}; "
                    f"{kept}")


def train_loop(run: Run, state: RunState, batches: TrainLoader, stop: StopRequest, mix: list) -> dict:
    cfg = run.cfg
    announce(run, mix)
    bar = ProgressBar(cfg.train.steps * run.global_batch, "train", initial=state.samples,
                      enabled=progress_enabled(run.info.rank))
    window = LogWindow()
    last_saved = state.step if run.resume_tag is not None else -1
    while state.step < cfg.train.steps:
        if run.peers is not None:
            run.peers.step = state.step + 1  # the step this rank has begun, for a peer whose collective fails
        taken = batches.consumed
        try:
            stop_now = step_once(run, state, batches, stop, window)
        except StopWhileWaiting as e:
            return stop_while_waiting(run, state, stop, last_saved, taken != batches.consumed, e)
        bar.update(run.global_batch, step=f"{state.step}/{cfg.train.steps}")
        if state.step % cfg.train.log_every == 0 or state.step == cfg.train.steps:
            log_window(run, state, window, bar)
            window = LogWindow()
        check_health(run, state)
        if stop_now:
            if run.info.is_main:
                log.warning("stop requested by SIGTERM/SIGUSR1 to at least one rank: checkpoint at step %d, "
                            "then exit", state.step)
            save_checkpoint(run, state)
            bar.close()
            return {"preempted": {"step": state.step, "signal": stop.signal}}
        if cfg.train.eval_every and state.step % cfg.train.eval_every == 0 and state.step < cfg.train.steps:
            results = evaluate(run, cfg.data.eval_split, state.step, examples=True)
            if run.info.is_main:
                log.info("step %d %s split:\n%s", state.step, cfg.data.eval_split, results_table(results))
        if cfg.train.ckpt_every and state.step % cfg.train.ckpt_every == 0 and state.nonfinite_streak == 0:
            save_checkpoint(run, state)
            last_saved = state.step
    bar.close()
    if last_saved != state.step:
        save_checkpoint(run, state)
    return final_evaluation(run, state)


def stop_while_waiting(run: Run, state: RunState, stop: StopRequest, last_saved: int, step_begun: bool,
                       waited: StopWhileWaiting) -> dict:
    """A stop request met a wait for data that did not end within the grace. The last completed step is
    checkpointed when that is safe: one process (peers may sit in the step's collective, which a checkpoint
    would not match), a step completed since the last checkpoint, and no batch of the unfinished step taken
    (the data position would skip it). Otherwise the run ends with one line (StoppedWithoutCheckpoint)."""
    name = signal.Signals(stop.signal).name
    why = f"stop requested by {name} while waiting for training data ({waited})"
    if run.info.world_size == 1 and 0 < state.step != last_saved and not step_begun:
        log.warning("%s: checkpoint at step %d, then exit", why, state.step)
        save_checkpoint(run, state)
        return {"preempted": {"step": state.step, "signal": stop.signal}}
    if state.step == 0 or state.step == last_saved:
        kept = "nothing new to save" + (f" since the checkpoint of step {last_saved}" if state.step else "")
    else:
        reason = ("the other ranks may be inside the next step's collective" if run.info.world_size > 1
                  else "a batch of the next step was already taken")
        kept = f"step {state.step} is not saved ({reason}); the last complete checkpoint in {run.ckpt_dir} is kept"
    raise StoppedWithoutCheckpoint(f"{why}; {kept}; continue with --resume latest once the data is readable "
                                   f"(data.shards={redact_url(run.cfg.data.shards)})", stop.signal)


def load_init_weights(model: torch.nn.Module, path: str, keep_share: bool = False) -> None:
    """model.init_from: the fp32 weights of `python -m trainer.export`, and unless keep_share (a fixed
    model.local_score_weight) the concatenation's share it carries."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        share = None if keep_share else exported_share(saved)
        model.load_state_dict(saved["state_dict"])
        if share is not None and getattr(model, "local_space", False):  # the share its run chose on validation
            model.local_share = share
    except (OSError, RuntimeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"model.init_from: cannot load {path} into this model: {e}") from e
    log.info("initial weights from %s (step %s of %s)", path, saved.get("step"), saved.get("run"))


def configure_device(cfg: Config, info: DistInfo) -> None:
    """CPU: torch threads per process (cores / local processes unless engine.threads). GPU: TF32 for fp32
    matmuls and convolutions (engine.tf32), as large-scale trainers run fp32 on tensor cores."""
    if info.device.type == "cpu":
        threads = cfg.engine.threads or max(1, (os.cpu_count() or 1) // max(1, info.local_world_size))
        torch.set_num_threads(threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = cfg.engine.tf32
        torch.backends.cudnn.allow_tf32 = cfg.engine.tf32



def _main(argv: list[str] | None) -> int:
    args = train_args.parse_args(argv)
    cfg = train_args.resolved_config(args)  # ConfigError names the key: one line, exit 2 (shards.cli)
    if args.overwrite and cfg.run.resume:
        raise ConfigError(f"--overwrite starts the run afresh and run.resume={cfg.run.resume} continues it: give one "
                          "of them")
    if args.print_config:  # shards and checkpoints need not exist yet: nothing starts
        print(cfg.to_yaml(), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    peers_answer = True
    try:
        train(cfg, overwrite=args.overwrite)  # a refusal before any work (ConfigError) is the same on all ranks
    except (StoppedWithoutCheckpoint, PeerLost) as e:
        peers_answer = not isinstance(e, PeerLost)
        print(f"{train_args.PROG}: stopped: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        shutdown(peers_answer)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Options and overrides in any order (trainer.train_args); exit 2 with one line on bad input, 130 when
    interrupted (Ctrl-C), 0 after a SIGTERM/SIGUSR1 checkpoint."""
    return cli_main(_main, argv, train_args.PROG,
                    interrupted_hint="the last complete checkpoint is kept; continue with --resume latest")


if __name__ == "__main__":
    sys.exit(main())
