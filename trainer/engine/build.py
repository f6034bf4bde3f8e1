"""The DeepSpeed engine: its JSON config merged with the YAML tree, AdamW, warmup + cosine, checkpoints.

Batch sizes live in the YAML (data.batch_size per rank, engine.grad_accum); a DeepSpeed JSON may leave them out
or say "auto". If it names them and they disagree with the YAML, the run is refused before any work, since
DeepSpeed would otherwise train with a batch the loss does not expect.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from trainer.config import Config, ConfigError, OptimConfig

_BATCH_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size")


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") == "cpu"


def _pin_offload_memory(ds: dict, cuda: bool) -> None:
    """On GPU machines offloaded states live in pinned host memory (DMA without a staging copy); on CPU-only
    machines pinning buys nothing and needs a CUDA runtime, so it is left off."""
    zero = ds.get("zero_optimization", {})
    for key in ("offload_optimizer", "offload_param"):
        if zero.get(key, {}).get("device", "none") == "cpu":
            zero[key]["pin_memory"] = cuda


def deepspeed_config(cfg: Config, world_size: int, cuda: bool | None = None) -> dict:
    """The JSON file's settings, with batch sizes, clipping and precision filled in from the YAML tree.
    cuda: whether this machine trains on GPUs (default: torch.cuda.is_available())."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    path = Path(cfg.engine.deepspeed_config)
    try:
        ds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"engine.deepspeed_config: cannot read {path}: {e}") from e
    want = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.engine.grad_accum,
        "train_batch_size": cfg.data.batch_size * cfg.engine.grad_accum * world_size,
    }
    for key in _BATCH_KEYS:
        given = ds.get(key, "auto")
        if given != "auto" and given != want[key]:
            raise ConfigError(
                f"engine.deepspeed_config: {path} sets {key}={given} but the YAML gives {want[key]} "
                f"(data.batch_size={cfg.data.batch_size}, engine.grad_accum={cfg.engine.grad_accum}, "
                f"world size {world_size}); make them agree or set it to \"auto\"")
    if "optimizer" in ds or "scheduler" in ds:
        raise ConfigError(f"engine.deepspeed_config: {path} defines an optimizer/scheduler; they come from the "
                          f"optim section of the YAML (AdamW, warmup + cosine)")
    for half in ("fp16", "bf16"):
        if ds.get(half, {}).get("enabled"):
            raise ConfigError(f"engine.deepspeed_config: {path} enables {half}; set engine.precision=bf16 in the "
                              f"YAML instead (bf16 autocast over fp32 master weights)")
    ds.update(want)
    if cfg.engine.compile and ds.get("zero_optimization", {}).get("stage", 0) >= 3:
        raise ConfigError(f"engine.compile: {path} is ZeRO-3, whose per-module parameter gathering breaks "
                          f"compiled graphs; use ZeRO 0-2 with engine.compile=true")
    _pin_offload_memory(ds, cuda)
    ds["gradient_clipping"] = cfg.optim.grad_clip
    # engine.precision=bf16 is autocast inside the model (trainer.training.factory.autocast_dtype): DeepSpeed keeps fp32
    # parameters, which are the master weights, with fp32 gradients and optimizer state.
    ds["bf16"] = {"enabled": False}
    ds.setdefault("steps_per_print", 10**9)  # we log ourselves
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def param_groups(model: torch.nn.Module, weight_decay: float, lr: float | None = None) -> list[dict]:
    """No weight decay on biases, norms and 1-d parameters (scales), as usual. Pretrained weights learn at their
    own rate: a backbone's parameters (`model.pretrained_parameters()`) get groups of their own, marked
    "pretrained", for the schedule of backbone_lr_factor; a parameter with an `lr_mult` attribute (a pretrained
    text encoder, set where it is loaded) gets learning rate lr * lr_mult. Frozen parameters are left out."""
    pretrained_ids = {id(p) for p in getattr(model, "pretrained_parameters", list)()}
    groups: dict[tuple[bool, float, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            key = (id(p) in pretrained_ids, float(getattr(p, "lr_mult", 1.0)), p.ndim > 1)
            groups.setdefault(key, []).append(p)
    out = []
    for (pretrained, mult, decays), params in sorted(groups.items(), key=lambda kv: kv[0]):
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0, "pretrained": pretrained}
        if lr is not None:
            group["lr"] = lr * mult
        out.append(group)
    return out


def backbone_lr_factor(step: int, o: OptimConfig, total: int) -> float:
    """A pretrained backbone's LR multiplier: 0 for the first o.backbone_freeze_steps steps, then the shared
    schedule times o.backbone_lr_mult, ramped in linearly over o.warmup_steps after the freeze (its Adam moments
    start from nothing then, as at step 0)."""
    if step < o.backbone_freeze_steps:
        return 0.0
    ramp = min(1.0, (step - o.backbone_freeze_steps + 1) / o.warmup_steps) if o.warmup_steps else 1.0
    return o.backbone_lr_mult * ramp * warmup_cosine(step, o.warmup_steps, total, o.min_lr_ratio)


def backbone_lr(engine) -> float | None:
    """The learning rate a pretrained backbone trains with now (None without one): 0 during its freeze."""
    rates = [g["lr"] for g in engine.optimizer.param_groups if g.get("pretrained")]
    return rates[0] if rates else None


def build_optimizer(groups: list[dict], o: OptimConfig, offloaded: bool, cuda: bool) -> torch.optim.Optimizer:
    """AdamW. With the optimizer offloaded on a GPU machine, DeepSpeed's CPU Adam (vectorised C++, several
    times torch's AdamW on host tensors); elsewhere torch's AdamW, since CPU Adam is compiled at run time
    (about 45 s on a fresh machine) and buys nothing when everything is on the CPU anyway."""
    if offloaded and cuda:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), adamw_mode=True)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), fused=o.fused)


def build_engine(cfg: Config, model: torch.nn.Module, ds_config: dict):
    """`ds_config` from `deepspeed_config`, computed (and so checked) before any work starts.

    A pretrained backbone that trains is in the optimizer from the start, also while optim.backbone_freeze_steps
    holds it still: ZeRO builds its flat, partitioned parameter groups once, at initialize, from the parameters
    that require gradients then, so parameters switched on later would never be updated. During the freeze its
    groups' learning rate is 0 and the backbone runs without autograd (HierarchicalEmbedder.set_backbone_grad):
    no compute spent on its gradients and no share in the clipped gradient norm; ZeRO treats its gradients as
    zero and AdamW (lr 0, decoupled decay lr * wd = 0) leaves it as it is."""
    import deepspeed

    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.lr)
    optimizer = build_optimizer(groups, o, offloaded=offloads_optimizer(ds_config), cuda=torch.cuda.is_available())
    total = cfg.train.steps
    schedules = [(lambda s: backbone_lr_factor(s, o, total)) if group["pretrained"] else
                 (lambda s: warmup_cosine(s, o.warmup_steps, total, o.min_lr_ratio)) for group in groups]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    return engine
