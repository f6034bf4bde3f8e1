"""TensorBoard on rank 0 only; every other rank gets a logger that does nothing.

Tags: loss/<term>, train/{lr,samples_per_s,data_wait_s,step_s,grad_norm,bad_samples,...},
eval_<split>/<score>/<metric> for score in global, local, concat.
"""
from __future__ import annotations

from pathlib import Path


class RunLogger:
    def __init__(self, log_dir: str | Path, enabled: bool):
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}{name}", float(value), step)

    def retrieval(self, step: int, split: str, results: dict) -> None:
        """R@K and rSum of each score; one chart per metric holds the three scores."""
        if self.writer is None:
            return
        for score in ("global", "local", "concat"):
            for metric, value in results.get(score, {}).items():
                self.writer.add_scalar(f"eval_{split}/{score}/{metric}", float(value), step)

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
