"""GPU-facing engine options, checked where a CPU can check them: offload with pinned memory and CPU Adam on GPU
machines (torch AdamW elsewhere), torch.compile of the encoders (refused under ZeRO-3), TF32 on CUDA only."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.engine.build import build_optimizer, deepspeed_config, param_groups
from trainer.training.factory import build_model, compile_encoders

REPO = Path(__file__).resolve().parents[2]
TINY = ("data.batch_size=8", "model.embed_dim=32", "model.cnn_width=16", "model.gru_hidden=32", "model.word_dim=16",
        "data.image_size=32", "data.num_workers=1", "data.shuffle_buffer=32", "engine.threads=1",
        "train.log_every=1", "train.eval_every=0", "train.ckpt_every=0")


def config(*overrides: str, zero: str = "zero0"):
    return load_config(REPO / "configs" / "builtin.yaml", [
        f"engine.deepspeed_config={REPO / 'configs' / 'deepspeed' / f'{zero}.json'}", *TINY, *overrides],
        check_paths=False)


@pytest.mark.parametrize("zero", ["zero2_offload", "zero3_offload"])
def test_offloaded_states_are_pinned_on_gpu_machines_only(zero):
    on_gpu = deepspeed_config(config(zero=zero), world_size=8, cuda=True)["zero_optimization"]
    on_cpu = deepspeed_config(config(zero=zero), world_size=2, cuda=False)["zero_optimization"]
    for key in ("offload_optimizer", "offload_param"):
        if key in on_gpu:
            assert on_gpu[key]["pin_memory"] is True and on_cpu[key]["pin_memory"] is False, key


def test_offload_on_gpu_machines_uses_deepspeed_cpu_adam(monkeypatch):
    """DeepSpeedCPUAdam itself is compiled at first use (45 s on CPU), so a stand-in records the choice."""
    made = []

    class FakeCPUAdam(torch.optim.AdamW):
        def __init__(self, params, **kwargs):
            made.append(kwargs)
            super().__init__(params, lr=kwargs["lr"], betas=kwargs["betas"])

    monkeypatch.setitem(sys.modules, "deepspeed.ops.adam", types.SimpleNamespace(DeepSpeedCPUAdam=FakeCPUAdam))
    cfg = config()
    model = torch.nn.Linear(4, 4)
    opt = build_optimizer(param_groups(model, 0.01, cfg.optim.lr), cfg.optim, offloaded=True, cuda=True)
    assert isinstance(opt, FakeCPUAdam) and made == [{"lr": cfg.optim.lr, "betas": tuple(cfg.optim.betas),
                                                      "adamw_mode": True}]
    for offloaded, cuda in ((True, False), (False, True), (False, False)):
        opt = build_optimizer(param_groups(model, 0.01, cfg.optim.lr), cfg.optim, offloaded=offloaded, cuda=cuda)
        assert type(opt) is torch.optim.AdamW
    assert len(made) == 1


def test_compile_is_refused_under_zero3_before_any_work():
    with pytest.raises(ConfigError, match="engine.compile: .*ZeRO-3"):
        deepspeed_config(config("engine.compile=true", zero="zero3"), world_size=1, cuda=False)


def test_compiled_encoders_keep_names_and_outputs():
    torch.manual_seed(0)
    cfg = config()
    model = build_model(cfg, SimpleNamespace(vocab=[None] * 30, num_concepts=5)).eval()
    images = torch.randn(2, 3, 32, 32)
    tokens, lengths = torch.tensor([[2, 3, 4], [5, 6, 0]]), torch.tensor([3, 2])
    with torch.no_grad():
        before = model(images, tokens, lengths)
    names = list(model.state_dict())
    compile_encoders(model, "eager")
    assert list(model.state_dict()) == names  # checkpoints do not depend on engine.compile
    with torch.no_grad():
        after = model(images, tokens, lengths)
    for key in before:
        torch.testing.assert_close(after[key], before[key])


@pytest.mark.slow
def test_training_with_engine_compile_runs_to_its_end(tiny_shards, tmp_path):
    """engine.compile=true through the trainer (the eager backend: the same wiring, no C++ toolchain needed)."""
    from trainer.training.loop import train

    out = tmp_path / "run"
    cfg = load_config(REPO / "configs" / "builtin.yaml", [
        f"data.shards={tiny_shards}", f"run.out_dir={out}",
        f"engine.deepspeed_config={REPO}/configs/deepspeed/zero2.json",
        *TINY, "train.steps=2", "engine.compile=true", "engine.compile_backend=eager"])
    final = train(cfg)
    assert final["test"]["counts"]["images"] == 32
    assert [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()] == [1, 2]
