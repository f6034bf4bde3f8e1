"""How a test's worker process runs on every rank and ends once its results are saved.

Several DeepSpeed engines (ZeRO 0-3) in one process leave gloo threads that C++ static destructors at interpreter
exit sometimes meet still joinable: "terminate called without an active exception", SIGABRT, about 1 run in 5 of
the plan's 2-process worker on 2 cores. That happens after the work, so the worker leaves without running them.
"""
import os
import sys
import traceback
from collections.abc import Callable

import torch

from trainer.distributed import DistInfo, init_distributed, shutdown


def leave(code: int | None) -> None:
    """Flush what was printed, then end the process with `code` (0 for None) without interpreter teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


def run_and_leave(compute: Callable[[DistInfo], object], out_path: str) -> None:
    """On every rank: the process group, one torch thread, results = compute(info); rank 0 saves them to out_path;
    then the group is destroyed and the process leaves. An error leaves at once with exit 1, so the other ranks
    fail in their next collective instead of waiting for this one."""
    info = init_distributed()
    torch.set_num_threads(1)
    try:
        results = compute(info)
    except Exception:
        traceback.print_exc()
        leave(1)
    if info.is_main:
        torch.save(results, out_path)
    shutdown()
    leave(0)
