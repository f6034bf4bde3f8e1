"""The capacity planner behind `python -m trainer.plan`: per-GPU memory of a configured run under each ZeRO stage,
and the largest batch that fits. What it counts, and the command's help: trainer/tools/plan_args.py."""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from trainer.config import Config, ConfigError, load_config
from trainer.data.shardset import ShardSet
from trainer.data.text import PAD, UNK, CaptionTokenizer, Vocab
from trainer.tools.plan_args import PROG, build_parser
from trainer.training.factory import build_model, build_tokenizer
from usercli import cli_main

GIB = 2**30
# Peak loss memory per scored (row, column) pair, forward + backward: bench/loss_scaling.py measured ~56 B
# (float32 scores, hinge costs, Jaccard labels, soft targets, log-softmax and their gradients, boolean masks).
LOSS_BYTES_PER_PAIR = 64
# Per gathered row and concept: the float32 indicator copies of image and caption concept sets.
LOSS_BYTES_PER_CONCEPT_CELL = 8
ADAM_MOMENTS = 2
EMBEDDING_KEYS_LOCAL = ("img_g", "img_l", "txt_g", "txt_l")


@dataclass(frozen=True)
class StateBytes:
    """Bytes of model states one GPU holds (CPU-side bytes separately, for offload)."""

    params: int
    grads: int
    master: int
    optimizer: int
    cpu: int = 0

    @property
    def total(self) -> int:
        return self.params + self.grads + self.master + self.optimizer


def _split(count: int, world: int) -> int:
    return math.ceil(count / world)


def model_state_bytes(num_params: int, stage: int, world: int, bf16: bool, offload: bool = False) -> StateBytes:
    """Per-GPU bytes of parameters, gradients, fp32 master weights and AdamW moments (see the module doc)."""
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0, 1, 2 or 3; got {stage}")
    if offload and stage == 0:
        raise ValueError("CPU offload needs ZeRO stage 1, 2 or 3")
    width = 2 if bf16 else 4
    p = num_params
    if stage == 0:
        # fp32: torch AdamW updates the module's own parameters, no master copy; bf16: DeepSpeed's BF16 optimizer
        # keeps fp32 master weights and fp32 gradient accumulators beside the bf16 ones.
        return StateBytes(params=width * p, grads=width * p + (4 * p if bf16 else 0), master=4 * p if bf16 else 0,
                          optimizer=ADAM_MOMENTS * 4 * p)
    part = _split(p, world)
    # ZeRO 1/2 always hold a fp32 copy of their partition (also in fp32 training) with its fp32 gradient.
    master, moments, fp32_grad = 4 * part, ADAM_MOMENTS * 4 * part, 4 * part
    params = width * (part if stage == 3 else p)
    grads = width * (p if stage == 1 else part)
    if offload:
        return StateBytes(params=params, grads=grads, master=0, optimizer=0, cpu=master + moments + fp32_grad
                          + (params if stage == 3 else 0))
    return StateBytes(params=params, grads=grads + fp32_grad, master=master, optimizer=moments)


def gathered_bytes(num_columns: int, embed_dim: int, num_concepts: int, local_space: bool, bf16: bool) -> dict:
    """Bytes of the global batch each rank holds after `gather_global_batch` (the whole N, its own rows included)."""
    keys = 4 if local_space else 2
    width = 2 if bf16 else 4
    return {"embeddings": keys * num_columns * embed_dim * width, "image_ids": 8 * num_columns,
            "concepts": 2 * num_columns * num_concepts * 4}


def loss_bytes(rows: int, columns: int, num_concepts: int) -> int:
    return LOSS_BYTES_PER_PAIR * rows * columns + LOSS_BYTES_PER_CONCEPT_CELL * columns * num_concepts


def cached_bytes(rows: int, embed_dim: int, num_concepts: int, local_space: bool, concept_head: bool) -> int:
    """engine.grad_cache: this rank's cached outputs of all its micro-batches (fp32 embeddings, concept logits)
    and the cached gradients of as many bytes, held from the first forwards to the last backward."""
    outputs = (4 if local_space else 2) * rows * embed_dim * 4 + (2 * rows * num_concepts * 4 if concept_head else 0)
    return 2 * outputs


def example_batch(model: torch.nn.Module, caption: list[int], batch_size: int, image_size: int) -> dict:
    """A full-size training batch for `model`: pictures [B, 3, S, S], or as many region features as the model
    takes ([B, max_regions, region_dim] with full counts), and `caption` (token ids of the configured tokenizer,
    so a transformer gets its [CLS] ... [SEP]) repeated B times. Lengths on the host, as the data pipeline's."""
    gen = torch.Generator().manual_seed(0)
    batch = {"tokens": torch.tensor([caption] * batch_size), "lengths": torch.full((batch_size,), len(caption))}
    if model.variable_image_parts:
        encoder = model.image_encoder
        # float16, as decode_features delivers them (the model widens them itself)
        batch["images"] = torch.randn(batch_size, encoder.num_parts, encoder.out_dim, generator=gen).half()
        batch["image_lengths"] = torch.full((batch_size,), encoder.num_parts)
    else:
        batch["images"] = torch.randn(batch_size, 3, image_size, image_size, generator=gen)
    return batch


def saved_activation_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of the distinct storages autograd saves during one training forward of `batch`."""
    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:  # weights are counted as model states
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(batch["images"], batch["tokens"], batch["lengths"], batch.get("image_lengths"))
    del out
    return sum(storages.values())


@dataclass(frozen=True)
class ActivationEstimate:
    per_sample: int
    fixed: int

    def at(self, batch_size: int) -> int:
        return self.fixed + self.per_sample * batch_size


def activation_estimate(model: torch.nn.Module, caption: list[int], image_size: int, small: int = 2,
                        large: int = 6) -> ActivationEstimate:
    """Linear fit of saved-activation bytes between two small batches (see example_batch and
    saved_activation_bytes); the model's own autocast (engine.precision) decides the activations' dtype."""
    a = saved_activation_bytes(model, example_batch(model, caption, small, image_size))
    b = saved_activation_bytes(model, example_batch(model, caption, large, image_size))
    per_sample = max(0, math.ceil((b - a) / (large - small)))
    return ActivationEstimate(per_sample=per_sample, fixed=max(0, a - per_sample * small))


@dataclass
class Plan:
    cfg: Config
    world: int
    num_params: int
    activations: ActivationEstimate
    vocab_size: int
    num_concepts: int

    @property
    def bf16(self) -> bool:
        return self.cfg.engine.precision == "bf16"

    @property
    def grad_cache(self) -> bool:
        return self.cfg.engine.grad_cache

    def per_gpu(self, stage: int, offload: bool, rows: int, accum: int = 1) -> dict[str, int]:
        """Every counted part of one GPU's memory for `rows` pairs per rank and micro-batch; with engine.grad_cache
        the loss, the gather and the cache cover all `accum` micro-batches (plain accumulation: one at a time)."""
        scored = rows * accum if self.grad_cache else rows
        columns = scored * self.world
        # bf16 is autocast: parameters, gradients and the gathered embeddings stay fp32 (see the module doc)
        states = model_state_bytes(self.num_params, stage, self.world, False, offload)
        local_space = self.cfg.loss.local != "none"
        gathered = gathered_bytes(columns, self.cfg.model.embed_dim, self.num_concepts, local_space, False)
        parts = {"params": states.params, "grads": states.grads, "master": states.master,
                 "optimizer": states.optimizer, "activations": self.activations.at(rows),
                 "loss": loss_bytes(scored, columns, self.num_concepts), "gathered": sum(gathered.values())}
        if self.grad_cache:
            parts["cache"] = cached_bytes(scored, self.cfg.model.embed_dim, self.num_concepts, local_space,
                                          self.cfg.loss.concept_bce_weight > 0)
        parts["total"] = sum(parts.values())
        parts["cpu"] = states.cpu
        return parts

    def largest_rows(self, stage: int, offload: bool, budget: int) -> int:
        """The most pairs per rank whose total fits `budget` bytes (0 if not even one)."""
        return largest_fitting(lambda rows: self.per_gpu(stage, offload, rows)["total"] <= budget)

    def largest_accum(self, stage: int, offload: bool, budget: int) -> int:
        """engine.grad_cache: the most micro-batches of data.batch_size pairs per step that fit `budget` bytes."""
        n = self.cfg.data.batch_size
        return largest_fitting(lambda accum: self.per_gpu(stage, offload, n, accum)["total"] <= budget)


def largest_fitting(fits) -> int:
    """The largest count >= 1 for which fits(count) holds (fits grows monotonically false), 0 if none."""
    low, high = 0, 1
    while fits(high):
        low, high = high, high * 2
        if high > 2**30:
            break
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


def stand_in_vocab(vocab_size: int) -> Vocab:
    """A word vocabulary of `vocab_size` entries, for planning without the shard set at hand."""
    if vocab_size < 3:
        raise ConfigError(f"--vocab-size must be at least 3 (<pad>, <unk> and a word), got {vocab_size}")
    return Vocab([PAD, UNK] + [f"word{i}" for i in range(vocab_size - 2)])


def full_length_caption(tokenizer: CaptionTokenizer) -> list[int]:
    """Token ids of a caption the tokenizer cuts at its max_len: the worst case for activations."""
    return tokenizer.encode(" ".join(["word0"] * (2 * tokenizer.max_len)))


def make_plan(cfg: Config, world: int, vocab_size: int, num_concepts: int) -> Plan:
    vocab = stand_in_vocab(vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg, SimpleNamespace(vocab=vocab, num_concepts=num_concepts))
    num_params = sum(p.numel() for p in model.parameters())
    caption = full_length_caption(build_tokenizer(cfg, vocab))
    acts = activation_estimate(model, caption, cfg.data.image_size)
    return Plan(cfg, world, num_params, acts, vocab_size, num_concepts)


def shard_set_sizes(cfg: Config, vocab_size: int | None, num_concepts: int | None) -> tuple[int, int]:
    """(vocabulary size, number of concepts): given, or read from the config's shard set."""
    if vocab_size is not None and num_concepts is not None:
        return vocab_size, num_concepts
    try:
        shardset = ShardSet.open(cfg.data.shards)
    except ValueError as e:
        raise ConfigError(f"data.shards: {e}; or pass --vocab-size and --num-concepts") from e
    return (vocab_size or len(shardset.vocab)), (num_concepts if num_concepts is not None else shardset.num_concepts)


def format_plan(plan: Plan, gpu_mem_gib: float, headroom: float) -> str:
    cfg, world = plan.cfg, plan.world
    n = cfg.data.batch_size
    budget = int(gpu_mem_gib * GIB * headroom)
    gathered = gathered_bytes(n * world, cfg.model.embed_dim, plan.num_concepts, cfg.loss.local != "none", plan.bf16)
    lines = [
        f"{world} GPUs, {plan.num_params / 1e6:.2f}M parameters, {cfg.engine.precision}, data.batch_size n={n} "
        f"per rank, N={n * world} columns; budget {headroom:.0%} of {gpu_mem_gib:g} GiB",
        f"activations (measured on CPU): {plan.activations.per_sample / 2**20:.2f} MiB per sample + "
        f"{plan.activations.fixed / 2**20:.2f} MiB fixed",
        f"loss: {LOSS_BYTES_PER_PAIR} B per (row, column) pair = {LOSS_BYTES_PER_PAIR // 4} float32 n x N matrices "
        f"({4 * n * n * world / 2**20:.1f} MiB each at n={n})",
        f"all-gathered per step and rank (received {(world - 1) / world:.0%} of it): embeddings "
        f"{gathered['embeddings'] / 2**20:.1f} MiB (and as much again in gradients in backward), image ids "
        f"{gathered['image_ids'] / 2**20:.2f} MiB, concepts {gathered['concepts'] / 2**20:.1f} MiB",
        *grad_cache_lines(plan),
        "",
        *stage_table(plan, budget),
    ]
    return "\n".join(lines)


def grad_cache_lines(plan: Plan) -> list[str]:
    """What engine.grad_cache changes in the plan (nothing without it)."""
    if not plan.grad_cache:
        return []
    k, n, world = plan.cfg.engine.grad_accum, plan.cfg.data.batch_size, plan.world
    return [f"engine.grad_cache with k={k}: activations of one micro-batch of n={n}; the loss scores k n = {k * n} "
            f"rows against N = k n W = {k * n * world} columns; the largest global batch is bounded by the loss "
            f"matrices and the cached embeddings, not by activations (max k, max N below at n={n})"]


def stage_table(plan: Plan, budget: int) -> list[str]:
    """One line per ZeRO stage (and offload): MiB of each part at the configured batch, and the largest batch
    that fits: n per rank, or with engine.grad_cache the micro-batches k at the configured n."""
    n, world, k = plan.cfg.data.batch_size, plan.world, plan.cfg.engine.grad_accum
    keys = ["params", "grads", "master", "optimizer", "activations", "loss", "gathered",
            *(["cache"] if plan.grad_cache else []), "total", "cpu"]
    names = {"optimizer": "AdamW", "activations": "activ.", "gathered": "gather", "total": "total", "cpu": "CPU"}
    largest = "max k" if plan.grad_cache else "max n"
    lines = [" ".join([f"{'ZeRO':<10}", *(f"{names.get(key, key):>9}" for key in keys)])
             + f" | {largest:>7} {'max N':>9}",
             "MiB at n above" + " " * (10 * len(keys) + 12) + "| (fits the budget)"]
    for stage in (0, 1, 2, 3):
        for offload in ((False,) if stage == 0 else (False, True)):
            parts = plan.per_gpu(stage, offload, n, k)
            if plan.grad_cache:
                most = plan.largest_accum(stage, offload, budget)
                columns = most * n * world
            else:
                most = plan.largest_rows(stage, offload, budget)
                columns = most * world
            cells = " ".join(f"{parts[key] / 2**20:>9.1f}" for key in keys)
            name = f"{stage}{' +offload' if offload else ''}"
            lines.append(f"{name:<10} {cells} | {most:>7} {columns:>9}")
    return lines


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    cfg = load_config(args.config, args.overrides, check_paths=False)
    vocab, concepts = shard_set_sizes(cfg, args.vocab_size, args.num_concepts)
    try:
        plan = make_plan(cfg, args.gpus * args.nodes, vocab, concepts)
    except FileNotFoundError as e:  # a pretrained encoder's files, named
        raise ConfigError(str(e)) from e
    print(format_plan(plan, args.gpu_mem_gib, args.headroom))
    return 0


def main(argv: list[str] | None = None) -> int:
    """Exit 2 with one line on a bad option, config key or shard set (shards.cli)."""
    return cli_main(_main, argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
