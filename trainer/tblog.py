"""TensorBoard on rank 0 only; every other rank gets a logger that does nothing.

Tags: loss/<term>, train/{lr,samples_per_s,data_wait_s,step_s,grad_norm,bad_samples,...},
eval_<split>/<score>/<metric> for score in global, local, concat; examples/{text_to_image,image_to_text}
(retrieval examples as pictures) and the projector's <split>_retrieval_vectors (trainer.tb_examples).
"""
from __future__ import annotations

import re
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

    def retrieval_layout(self, splits: list[str]) -> None:
        """Custom-scalars charts: one per split and metric, the global, local and concat curves together."""
        if self.writer is None:
            return
        metrics = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["rsum"]
        # The chart's entries are regular expressions searched in the tags: anchored, or i2t_r1 would draw r10 too.
        layout = {f"retrieval {split}": {metric: ["Multiline", [f"^{re.escape(f'eval_{split}/{score}/{metric}')}$"
                                                               for score in ("global", "local", "concat")]]
                                         for metric in metrics}
                  for split in splits}
        self.writer.add_custom_scalars(layout)

    def eval_examples(self, step: int, emb: dict, shardset, split: str, local_weight: float) -> None:
        """Retrieval examples and the projector from one evaluation's embeddings (embed_split's output)."""
        if self.writer is None:
            return
        from trainer.tb_examples import log_eval_examples

        log_eval_examples(self.writer, step, emb, shardset, split, local_weight)

    def hparams(self, config: dict, results: dict, split: str) -> None:
        """The flattened config beside the final recalls of `split` (TensorBoard's HPARAMS tab)."""
        if self.writer is None:
            return
        flat = {}

        def walk(prefix: str, node) -> None:
            for key, value in node.items():
                name = f"{prefix}.{key}" if prefix else key
                if isinstance(value, dict):
                    walk(name, value)
                elif isinstance(value, (bool, int, float, str)):
                    flat[name] = value
                elif value is not None:
                    flat[name] = str(value)

        walk("", config)
        final = {f"final_{split}/{score}/{metric}": float(value)
                 for score in ("global", "local", "concat") for metric, value in results.get(score, {}).items()}
        self.writer.add_hparams(flat, final, run_name=".")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
