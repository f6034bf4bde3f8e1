"""trainer/distributed.py owns communication: no other module calls a torch.distributed collective; the group is
device-mapped on GPU machines; a one-process run goes through the same collectives as a large one.

What a CPU suite cannot show is NCCL itself (it refuses CPU tensors); the device-mapped group sends host tensors
over gloo and device tensors over NCCL, and these tests pin the parts of that design that can be checked here.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from trainer import distributed as comm

REPO = Path(__file__).resolve().parents[2]
OWNER = REPO / "trainer" / "distributed.py"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list", "barrier",
               "reduce_scatter", "reduce_scatter_tensor", "all_gather_into_tensor", "gather", "scatter",
               "all_to_all", "all_to_all_single", "reduce", "gather_object", "scatter_object_list",
               "all_gather_single", "reduce_scatter_single", "init_process_group", "destroy_process_group"}


def distributed_aliases(tree: ast.AST) -> set[str]:
    """Names under which a module reaches torch.distributed (import torch.distributed as dist, ...)."""
    names = {"torch.distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch.distributed"):
            names |= {f"<direct>{a.name}" for a in node.names if a.name in COLLECTIVES}
    return names


def collective_calls(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    aliases = distributed_aliases(tree)
    found = [f"{path.relative_to(REPO)}: imports {name[8:]} from torch.distributed" for name in aliases
             if name.startswith("<direct>")]
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if ast.unparse(node.func.value) in aliases:
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node.func)}")
    return found


def test_no_module_but_trainer_distributed_calls_a_collective():
    files = [p for folder in ("trainer", "shards", "bench", "tests", "launch") for p in (REPO / folder).rglob("*.py")]
    assert len(files) > 50
    # this file makes a one-process group of its own below, to test the helpers against a real one
    offenders = [hit for path in files if path not in (OWNER, Path(__file__)) for hit in collective_calls(path)]
    assert offenders == []


def test_the_checker_finds_a_collective_written_elsewhere(tmp_path):
    """The check above can fail: each way of reaching a collective is seen."""
    sample = REPO / "tests" / "_collective_sample.py"
    sample.write_text("import torch.distributed as dist\nimport torch\nfrom torch.distributed import all_reduce\n"
                      "dist.barrier()\ntorch.distributed.all_gather([], None)\n")
    try:
        assert len(collective_calls(sample)) == 3
    finally:
        sample.unlink()


def test_gpu_machines_get_one_device_mapped_group(monkeypatch):
    """On CUDA the group is cpu:gloo,cuda:nccl (host bookkeeping over gloo, bulk tensors over NCCL) and the
    rank's device is set before the group exists; on CPU it is gloo."""
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: calls.append(("init", kw["backend"])))
    import deepspeed

    monkeypatch.setattr(deepspeed, "init_distributed", lambda **kw: calls.append(("deepspeed", kw["dist_backend"])))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = comm.init_distributed()
    assert calls == [("set_device", 1), ("init", "cpu:gloo,cuda:nccl"), ("deepspeed", "nccl")]
    assert info.device == torch.device("cuda", 1)
    assert comm.backend_for(False) == "gloo"


@pytest.fixture
def one_process_group():
    """A real gloo group of one (what a one-GPU run has), restored afterwards."""
    if dist.is_initialized():
        yield
        return
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_world_of_one_runs_every_helper_through_its_collective(one_process_group, monkeypatch):
    """No world-size-1 shortcut: with a group of one, each helper still calls its collective, so a one-GPU run
    exercises the path a 64-GPU run takes."""
    called = []
    for name in ("all_reduce", "broadcast_object_list", "gather_object", "gather", "barrier"):
        original = getattr(dist, name)
        monkeypatch.setattr(dist, name, lambda *a, _o=original, _n=name, **k: (called.append(_n), _o(*a, **k))[1])
    original_single = comm._all_gather_single
    monkeypatch.setattr(comm, "_all_gather_single",
                        lambda *a, **k: (called.append("all_gather"), original_single(*a, **k))[1])
    x = torch.ones(3, 2, requires_grad=True)
    gathered = comm.gather_with_grad(x)
    gathered.sum().backward()  # the backward's all_reduce (gloo has no reduce_scatter)
    assert torch.equal(x.grad, torch.ones(3, 2))
    assert comm.all_reduce_sum(torch.tensor([2])).tolist() == [2]
    assert comm.all_reduce_max(torch.tensor([5])).tolist() == [5]
    assert comm.broadcast_object({"a": 1}) == {"a": 1}
    assert comm.gather_objects_to_main(7) == [7]
    assert comm.gather_rows_to_main(torch.zeros(0, 4)).shape == (0, 4)  # an empty share joins too
    comm.barrier()
    assert sorted(set(called)) == ["all_gather", "all_reduce", "barrier", "broadcast_object_list", "gather",
                                   "gather_object"], called
