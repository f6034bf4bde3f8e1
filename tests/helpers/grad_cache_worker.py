"""Worker process for tests/integration/test_grad_cache.py: one optimizer step with engine.grad_cache on 2 ranks
x k micro-batches, against one step of one process on the whole global batch of k n world pairs.

Launched as plain subprocesses (RANK / WORLD_SIZE / ... set, as a launcher would; none of them for a world of one):

    python tests/helpers/grad_cache_worker.py reference OUT.pt     # world size 1: one loss over all 8n pairs
    python tests/helpers/grad_cache_worker.py distributed OUT.pt   # world size 2: grad_cache_step, k = 4

The model has dropout: the regions image tower drops region_dropout of each picture's regions in training.
Dropout draws differ with how a batch is cut, so the reference draws the same numbers as the ranks do: each rank
seeds its generator with DROP_SEED + rank before the step, and the reference embeds the global batch as the ranks'
micro-batches in turn, seeding DROP_SEED + r before rank r's first one. The model treats every sample on its own
(GroupNorm-free heads, GPO per sample), so embedding in pieces with the graph kept and scoring the concatenation is
one forward of one process on the concatenated batch, with one loss, one backward and one optimizer step. A grad-
cache step whose second forward did not replay the first one's draws would then differ (negative control).

Each comparison runs in fp32 and in bf16 (engine.precision=bf16: autocast over fp32 master weights; the reference
then is the one-process bf16 step). Rank 0 writes {result name: {"loss", "init", "params", "grads", "exp_avg",
"exp_avg_sq"}} to OUT.pt; the reference writes "step" (fp32) and "step_bf16".
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from dist_worker import record_grads_before_step  # noqa: E402
from worker_exit import run_and_leave  # noqa: E402 (tests/helpers is on the path by now)

import trainer.training.step as step_module  # noqa: E402
from trainer.config import Config, load_config  # noqa: E402
from trainer.distributed import DistInfo, all_reduce_sum  # noqa: E402
from trainer.engine.build import build_engine, deepspeed_config  # noqa: E402
from trainer.training.factory import build_loss, build_model  # noqa: E402
from trainer.training.step import concept_logits, grad_cache_step, train_step  # noqa: E402

WORLD = 2
MICRO = 4  # k: micro-batches per rank per optimizer step
RANK_BATCH = 4  # n: pairs per micro-batch
GLOBAL_BATCH = WORLD * MICRO * RANK_BATCH
REGION_DIM, MAX_REGIONS, MAX_WORDS, VOCAB_SIZE, NUM_CONCEPTS = 16, 6, 6, 30, 10
SEED, DROP_SEED = 0, 1234
ZERO_CONFIGS = ("zero0", "zero1", "zero2", "zero3")
LR = 1e-4


def make_config(zero: str, batch_size: int, grad_accum: int = 1, grad_cache: bool = False,
                precision: str = "fp32") -> Config:
    """A tiny regions + GRU model with region dropout on, concept BCE on, plain fp32 AdamW without warmup;
    precision=bf16 runs the encoders under bf16 autocast over the fp32 master weights, as engine.precision=bf16 does."""
    return load_config(None, [
        f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / f'{zero}.json'}",
        f"engine.grad_accum={grad_accum}", f"engine.grad_cache={str(grad_cache).lower()}",
        f"engine.precision={precision}",
        f"data.batch_size={batch_size}", f"data.max_words={MAX_WORDS}", "model.image_encoder=regions",
        f"model.region_dim={REGION_DIM}", f"model.max_regions={MAX_REGIONS}", "model.region_dropout=0.3",
        "model.embed_dim=16", "model.gru_hidden=16", "model.word_dim=8", f"optim.lr={LR}", "optim.warmup_steps=0",
        "loss.hinge_warmup_steps=0", "loss.concept_bce_weight=0.5", f"run.seed={SEED}",
    ], check_paths=False)


def global_batch() -> dict:
    """A fixed batch of region features, captions and labels. Pictures repeat inside one micro-batch, across
    micro-batches of one rank and across ranks, so the same-image mask must hold over the whole gathered step."""
    g = torch.Generator().manual_seed(7)
    size = GLOBAL_BATCH
    images = torch.randn(size, MAX_REGIONS, REGION_DIM, generator=g)
    image_lengths = torch.randint(2, MAX_REGIONS + 1, (size,), generator=g)
    lengths = torch.randint(1, MAX_WORDS + 1, (size,), generator=g)
    tokens = torch.randint(2, VOCAB_SIZE, (size, MAX_WORDS), generator=g)
    tokens[torch.arange(MAX_WORDS).unsqueeze(0) >= lengths.unsqueeze(1)] = 0
    image_ids = torch.randint(-2**62, 2**62, (size,), generator=g)  # negative ids must survive the label packing
    image_concepts = (torch.rand(size, NUM_CONCEPTS, generator=g) < 0.3).float()
    caption_concepts = image_concepts * (torch.rand(size, NUM_CONCEPTS, generator=g) < 0.6).float()
    for first, second in ((0, 2), (1, RANK_BATCH + 3), (5, GLOBAL_BATCH // 2 + 6)):
        for value in (image_ids, images, image_lengths, image_concepts):
            value[second] = value[first]
    return {"images": images, "image_lengths": image_lengths, "tokens": tokens, "lengths": lengths,
            "image_ids": image_ids, "image_concepts": image_concepts, "caption_concepts": caption_concepts}


def micro_batch(batch: dict, rank: int, micro: int) -> dict:
    """Rank `rank`'s micro-batch `micro`: the global batch is rank 0's micro-batches, then rank 1's."""
    start = (rank * MICRO + micro) * RANK_BATCH
    return {key: value[start:start + RANK_BATCH] for key, value in batch.items()}


def new_engine(cfg: Config, info: DistInfo):
    torch.manual_seed(SEED)  # the same initial weights in every process
    shardset = SimpleNamespace(vocab=[None] * VOCAB_SIZE, num_concepts=NUM_CONCEPTS)
    return build_engine(cfg, build_model(cfg, shardset), deepspeed_config(cfg, info.world_size)), build_loss(cfg)


def full_params(engine) -> dict[str, torch.Tensor]:
    """Whole parameter values on every rank (gathered from the partitions under ZeRO-3)."""
    import deepspeed

    named = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None):
        return {name: p.detach().clone() for name, p in named}


def adam_moments(engine) -> dict[str, dict[str, torch.Tensor]]:
    """Whole Adam moments after a step on every rank (gathered from the partitions under ZeRO 1-3)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    zero_optimizer = engine.optimizer
    if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):
        # DeepSpeed 0.19's ZeRO 1-2 link each parameter to its optimizer state once, after the first param group's
        # step, when the later groups have no state yet (their moments then read as missing): link again now.
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()
    out: dict[str, dict[str, torch.Tensor]] = {"exp_avg": {}, "exp_avg_sq": {}}
    for key, moments in out.items():
        for name, p in engine.module.named_parameters():
            moment = safe_get_full_optimizer_state(p, key)
            if moment is None:  # no ZeRO: torch's AdamW holds whole moments
                moment = engine.client_optimizer.state[p][key]
            moments[name] = moment.detach().clone().reshape(getattr(p, "ds_shape", p.shape))
    return out


def result(engine, init: dict, grads: dict, loss: torch.Tensor) -> dict:
    return {"loss": float(loss), "init": init, "grads": grads, "params": full_params(engine), **adam_moments(engine)}


def run_step(cfg: Config, info: DistInfo, cached: bool) -> dict:
    """One optimizer step on this rank's k micro-batches: grad_cache_step, or k train_steps (plain accumulation).
    The loss reported is the global one (every term is a mean over the rank's rows: the mean over ranks)."""
    engine, loss_fn = new_engine(cfg, info)
    init, grads = full_params(engine), {}
    record_grads_before_step(engine, grads)
    batch = global_batch()
    micro_batches = [micro_batch(batch, info.rank, micro) for micro in range(MICRO)]
    torch.manual_seed(DROP_SEED + info.rank)
    if cached:
        loss = grad_cache_step(engine, loss_fn, micro_batches, 0, info)["loss"]
    else:
        loss = sum(train_step(engine, loss_fn, mb, 0, info)["loss"] for mb in micro_batches) / MICRO
    return result(engine, init, grads, all_reduce_sum(loss) / info.world_size)


def reference_step(info: DistInfo, precision: str) -> dict:
    """One process, one loss over the whole batch, one backward, one step (DeepSpeed ZeRO 0, no accumulation)."""
    engine, loss_fn = new_engine(make_config("zero0", GLOBAL_BATCH, precision=precision), info)
    init, grads = full_params(engine), {}
    record_grads_before_step(engine, grads)
    batch = global_batch()
    pieces = []
    for rank in range(WORLD):
        torch.manual_seed(DROP_SEED + rank)  # the draws rank `rank` makes for its micro-batches, in order
        for micro in range(MICRO):
            part = micro_batch(batch, rank, micro)
            pieces.append(engine(part["images"], part["tokens"], part["lengths"], part["image_lengths"]))
    out = {key: torch.cat([piece[key] for piece in pieces]) for key in pieces[0]}
    labels = {key: batch[key] for key in ("image_ids", "image_concepts", "caption_concepts")}
    loss = loss_fn({**out, **labels}, step=0, concept_logits=concept_logits(out))["loss"]
    engine.backward(loss)
    engine.step()
    return result(engine, init, grads, loss.detach())


def run_reference(info: DistInfo) -> dict:
    assert info.world_size == 1, "the reference runs in a world of one"
    return {"step": reference_step(info, "fp32"), "step_bf16": reference_step(info, "bf16")}


@contextmanager
def without_rng_replay():
    """grad_cache_step's second forwards under whatever RNG state comes, not the first forwards' (a wrong
    implementation the equivalence test must catch)."""
    real = step_module.replaying

    @contextmanager
    def no_replay(cache, micro):
        yield

    step_module.replaying = no_replay
    try:
        yield
    finally:
        step_module.replaying = real


def cached_step(zero: str, precision: str, info: DistInfo) -> dict:
    return run_step(make_config(zero, RANK_BATCH, MICRO, grad_cache=True, precision=precision), info, cached=True)


def run_distributed(info: DistInfo) -> dict:
    """Every ZeRO 0-2 engine and control first, ZeRO-3 last: DeepSpeed's ZeRO-3 engine patches torch's F.linear
    for the whole process, and an engine built after it would run under that patch."""
    assert info.world_size == WORLD, f"the distributed run expects {WORLD} processes"
    results = {f"cached/{zero}": cached_step(zero, "fp32", info) for zero in ZERO_CONFIGS if zero != "zero3"}
    results.update({f"cached_bf16/{zero}": cached_step(zero, "bf16", info) for zero in ZERO_CONFIGS if zero != "zero3"})
    results["plain_accum"] = run_step(make_config("zero0", RANK_BATCH, MICRO), info, cached=False)
    results["plain_accum_bf16"] = run_step(make_config("zero0", RANK_BATCH, MICRO, precision="bf16"), info,
                                           cached=False)
    with without_rng_replay():
        results["no_replay"] = cached_step("zero0", "fp32", info)
    results["cached/zero3"] = cached_step("zero3", "fp32", info)
    results["cached_bf16/zero3"] = cached_step("zero3", "bf16", info)
    return results


def main(argv: list[str]) -> None:
    mode, out_path = argv
    run_and_leave({"reference": run_reference, "distributed": run_distributed}[mode], out_path)

if __name__ == "__main__":
    main(sys.argv[1:])
