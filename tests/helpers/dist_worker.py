"""Worker process for tests/integration/test_distributed.py: optimizer steps of the real training path on a fixed batch.

Launched by the test as plain subprocesses with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set
(as torchrun or the deepspeed launcher would), or with none of them for a world of one:

    python tests/helpers/dist_worker.py reference OUT.pt     # world size 1: the whole global batch in one process
    python tests/helpers/dist_worker.py distributed OUT.pt   # world size 2: each rank its half of every batch

Everything goes through the trainer's own code: `build_model`, `build_loss`, `deepspeed_config`, `build_engine`
and `train_step` (forward, autograd all-gather, loss of own rows against all columns, backward, step).
Rank 0 writes {result name: {parameter name: tensor}} (and scalar losses) to OUT.pt; the test compares.
"""
from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from worker_exit import run_and_leave  # noqa: E402 (tests/helpers is on the path by now)

import trainer.training.step as train_module  # noqa: E402
from trainer.config import Config, load_config  # noqa: E402
from trainer.distributed import DistInfo, all_reduce_sum, gather_no_grad  # noqa: E402
from trainer.engine.build import build_engine, deepspeed_config  # noqa: E402
from trainer.training.factory import build_loss, build_model  # noqa: E402
from trainer.training.step import gather_global_batch, train_step  # noqa: E402

RANK_BATCH = 8  # n: pairs per rank per micro-step; the global micro-batch is n * 2
IMAGE_SIZE = 32
MAX_WORDS = 8
VOCAB_SIZE = 40
NUM_CONCEPTS = 12
SEED = 0
# DeepSpeed JSONs under configs/deepspeed/ (the offload ones run torch AdamW on the CPU copy of the weights)
ZERO_CONFIGS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")
ACCUM_CONFIGS = ("zero0", "zero2", "zero3")
BF16_CONFIGS = ("zero0", "zero1", "zero2", "zero3")
LR = 1e-4
GATHER_WITH_GRAD = train_module.gather_with_grad


def make_config(zero: str, batch_size: int, grad_accum: int = 1, precision: str = "fp32") -> Config:
    """A tiny model on plain fp32 AdamW (no LR warmup, so the first step uses the full rate); precision=bf16 runs
    the encoders under bf16 autocast, as engine.precision=bf16 does."""
    return load_config(None, [
        f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / f'{zero}.json'}",
        f"engine.grad_accum={grad_accum}", f"engine.precision={precision}", f"data.batch_size={batch_size}",
        f"data.image_size={IMAGE_SIZE}", f"data.max_words={MAX_WORDS}", "model.embed_dim=32", "model.cnn_width=16",
        "model.gru_hidden=32", "model.word_dim=16", f"optim.lr={LR}", "optim.warmup_steps=0",
        "loss.hinge_warmup_steps=0", "loss.concept_bce_weight=0.5", f"run.seed={SEED}",
    ], check_paths=False)


def synthetic_batch(size: int, seed: int) -> dict:
    """A fixed batch of random pictures, captions and concept labels. Two pictures appear twice: once inside
    the first rank's half and once across the halves, so the same-image mask must work across the gather."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    lengths = torch.randint(1, MAX_WORDS + 1, (size,), generator=g)
    tokens = torch.randint(2, VOCAB_SIZE, (size, MAX_WORDS), generator=g)
    tokens[torch.arange(MAX_WORDS).unsqueeze(0) >= lengths.unsqueeze(1)] = 0  # right padding
    image_ids = torch.randint(0, 2**62, (size,), generator=g)
    image_concepts = (torch.rand(size, NUM_CONCEPTS, generator=g) < 0.3).float()
    caption_concepts = image_concepts * (torch.rand(size, NUM_CONCEPTS, generator=g) < 0.6).float()
    half = size // 2
    for first, second in ((1, 3), (2, half + 2)):  # (same rank), (across ranks)
        image_ids[second] = image_ids[first]
        images[second] = images[first]
        image_concepts[second] = image_concepts[first]
    return {"images": images, "tokens": tokens, "lengths": lengths, "image_ids": image_ids,
            "image_concepts": image_concepts, "caption_concepts": caption_concepts}


def rank_part(batch: dict, info: DistInfo) -> dict:
    n = batch["images"].shape[0] // info.world_size
    return {k: v[info.rank * n: (info.rank + 1) * n] for k, v in batch.items()}


def concat(*batches: dict) -> dict:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def new_engine(cfg: Config, info: DistInfo):
    torch.manual_seed(SEED)  # the same initial weights in every process, as trainer.train does
    shardset = SimpleNamespace(vocab=[None] * VOCAB_SIZE, num_concepts=NUM_CONCEPTS)  # all build_model reads
    model = build_model(cfg, shardset)
    return build_engine(cfg, model, deepspeed_config(cfg, info.world_size)), build_loss(cfg)


def full_params(engine) -> dict[str, torch.Tensor]:
    """Whole parameter values on every rank; under ZeRO-3 they are gathered from the partitions first."""
    import deepspeed

    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {name: p.detach().clone() for name, p in named}


def record_grads_before_step(engine, into: dict) -> None:
    """Wrap engine.step so the averaged (unclipped) gradients are read just before the optimizer uses them.
    Adam's first update is close to lr * sign(grad), blind to the gradient's scale; the gradients are not."""
    from deepspeed.utils import safe_get_full_grad

    step = engine.step

    def step_recording_grads(*args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            into.update({name: safe_get_full_grad(p).detach().clone()
                         for name, p in engine.module.named_parameters()})
        return step(*args, **kwargs)

    engine.step = step_recording_grads


def one_step(cfg: Config, info: DistInfo, batch: dict) -> dict:
    """One optimizer step of train_step on this rank's part of `batch`; params, grads and the global loss."""
    engine, loss_fn = new_engine(cfg, info)
    init = full_params(engine)
    grads: dict = {}
    record_grads_before_step(engine, grads)
    losses = train_step(engine, loss_fn, rank_part(batch, info), 0, info)
    # every term is a mean over local rows: the global loss is the mean over ranks
    loss = all_reduce_sum(losses["loss"]) / info.world_size
    return {"init": init, "params": full_params(engine), "grads": grads, "loss": float(loss)}


def gather_local_slice_back(tensor: torch.Tensor) -> torch.Tensor:
    """OpenCLIP's gather: other ranks' rows without gradient, this rank's own rows put back with it."""
    rank, n = torch.distributed.get_rank(), tensor.shape[0]
    everything = gather_no_grad(tensor.detach())
    return torch.cat([everything[: rank * n], tensor, everything[(rank + 1) * n:]])


def accumulated_step(cfg: Config, info: DistInfo, micro_batches: list[dict]) -> dict:
    """engine.grad_accum micro-steps of train_step; params after each one."""
    engine, loss_fn = new_engine(cfg, info)
    out = {"init": full_params(engine)}
    for i, batch in enumerate(micro_batches):
        train_step(engine, loss_fn, rank_part(batch, info), 0, info)
        out[f"after_micro{i + 1}"] = full_params(engine)
    return out


def mean_loss_step(cfg: Config, info: DistInfo, micro_batches: list[dict]) -> dict:
    """The reference for accumulation, without DeepSpeed's: one step on the mean of each batch's own loss."""
    engine, loss_fn = new_engine(cfg, info)
    total = 0.0
    for batch in micro_batches:
        out = engine(batch["images"], batch["tokens"], batch["lengths"])
        logits = (out["img_concept_logits"], out["txt_concept_logits"]) if "img_concept_logits" in out else None
        total = total + loss_fn(gather_global_batch(out, batch), step=0, concept_logits=logits)["loss"]
    engine.backward(total / len(micro_batches))
    engine.step()
    return full_params(engine)


def run_reference(info: DistInfo) -> dict:
    assert info.world_size == 1, "the reference runs in a world of one"
    n_global = 2 * RANK_BATCH
    batch, batch_b = synthetic_batch(n_global, seed=1), synthetic_batch(n_global, seed=2)
    return {
        "step": one_step(make_config("zero0", n_global), info, batch),
        "step_bf16": one_step(make_config("zero0", n_global, precision="bf16"), info, batch),
        "accum": mean_loss_step(make_config("zero0", n_global), info, [batch, batch_b]),
        # Not what accumulation computes: one loss over both micro-batches (negatives from 4n pairs).
        "accum_as_one_batch": one_step(make_config("zero0", 2 * n_global), info, concat(batch, batch_b))["params"],
    }


def run_distributed(info: DistInfo) -> dict:
    assert info.world_size == 2, "the distributed run expects two processes"
    n_global = 2 * RANK_BATCH
    batch, batch_b = synthetic_batch(n_global, seed=1), synthetic_batch(n_global, seed=2)
    results = {f"step/{zero}": one_step(make_config(zero, RANK_BATCH), info, batch) for zero in ZERO_CONFIGS}
    results.update({f"step_bf16/{zero}": one_step(make_config(zero, RANK_BATCH, precision="bf16"), info, batch)
                    for zero in BF16_CONFIGS})
    train_module.gather_with_grad = gather_local_slice_back  # what train_step's gather resolves to
    try:
        results["no_grad_gather"] = one_step(make_config("zero0", RANK_BATCH), info, batch)
    finally:
        train_module.gather_with_grad = GATHER_WITH_GRAD
    for zero in ACCUM_CONFIGS:
        results[f"accum/{zero}"] = accumulated_step(make_config(zero, RANK_BATCH, grad_accum=2), info,
                                                    [batch, batch_b])
    return results


def main(argv: list[str]) -> None:
    mode, out_path = argv
    run_and_leave({"reference": run_reference, "distributed": run_distributed}[mode], out_path)

if __name__ == "__main__":
    main(sys.argv[1:])
