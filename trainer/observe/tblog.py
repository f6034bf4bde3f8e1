"""TensorBoard on rank 0 only; every other rank gets a logger that does nothing.

Layout (issue 17: a first screen a person can read):
- The run is named after its folder: RunLogger(RUN/tb) writes to RUN/tb/<RUN's name>, so
  `tensorboard --logdir RUN/tb` lists the run as "builtin", not ".", and `--logdir runs` tells runs apart.
- Tags: loss/<term>, train/{lr,samples_per_s,data_wait_s,step_s,grad_norm,bad_samples,...},
  eval_<split>/<score>/<metric> for score in global, local, concat; examples/{text_to_image,image_to_text}
  (retrieval examples as pictures) and the projector's <split>_retrieval_vectors (trainer.observe.tb_examples).
- data/bad/<kind> is written only from the first time that kind is non-zero: nine flat-zero charts would
  otherwise be the first thing TensorBoard shows (its groups sort by name, "data" before "eval" and "loss");
  train/bad_samples (the total) is always there, and train_log.jsonl keeps every count.
- Recall series told apart: TensorBoard colours a chart's series by run, so the three scores of one run share
  one colour in a custom-scalars chart. Each score therefore also writes recall_<split>/<metric> into a run of
  its own, RUN/tb/<name>/<score>: the custom-scalars charts ("retrieval <split>") and the plain scalars
  dashboard draw global, local and concat as three runs, in three colours, named by score.
"""
from __future__ import annotations

import re
from pathlib import Path

from trainer.observe.tb_examples import log_eval_examples

SCORES = ("global", "local", "concat")
BAD_PREFIX = "data/bad/"


def event_dir(log_dir: str | Path) -> Path:
    """Where RunLogger(log_dir) writes its events: log_dir/<name of log_dir's parent, the run folder>."""
    log_dir = Path(log_dir)
    return log_dir / (log_dir.resolve().parent.name or "run")


class RunLogger:
    def __init__(self, log_dir: str | Path, enabled: bool):
        self.writer = None
        self._score_writers: dict = {}
        self._nonzero: set[str] = set()
        if enabled:
            # imported by rank 0 only, the one that writes: TensorBoard takes a while to import on every rank
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(event_dir(log_dir)))

    def _score_writer(self, score: str):
        if score not in self._score_writers:
            from torch.utils.tensorboard import SummaryWriter  # rank 0 only, as in __init__

            self._score_writers[score] = SummaryWriter(log_dir=str(Path(self.writer.get_logdir()) / score))
        return self._score_writers[score]

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        if self.writer is None:
            return
        for name, value in values.items():
            tag = f"{prefix}{name}"
            if tag.startswith(BAD_PREFIX) and tag not in self._nonzero:
                if not value:
                    continue  # not a chart until this kind of bad sample occurs
                self._nonzero.add(tag)
            self.writer.add_scalar(tag, float(value), step)

    def retrieval(self, step: int, split: str, results: dict) -> None:
        """R@K and rSum of each score; one chart per metric holds the three scores."""
        if self.writer is None:
            return
        for score in SCORES:
            for metric, value in results.get(score, {}).items():
                self.writer.add_scalar(f"eval_{split}/{score}/{metric}", float(value), step)
                self._score_writer(score).add_scalar(f"recall_{split}/{metric}", float(value), step)

    def retrieval_layout(self, splits: list[str]) -> None:
        """Custom-scalars charts: one per split and metric, the global, local and concat curves together, each
        score its own run (so its own colour and name: see the module doc)."""
        if self.writer is None:
            return
        metrics = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)] + ["rsum"]
        # The chart's entries are regular expressions searched in the tags: anchored, or i2t_r1 would draw r10 too.
        layout = {f"retrieval {split}": {metric: ["Multiline", [f"^{re.escape(f'recall_{split}/{metric}')}$"]]
                                         for metric in metrics}
                  for split in splits}
        self.writer.add_custom_scalars(layout)

    def eval_examples(self, step: int, emb: dict, shardset, split: str, local_share: float) -> None:
        """Retrieval examples and the projector from one evaluation's embeddings (embed_split's output), the
        concatenation mixed with `local_share` (the evaluation's)."""
        if self.writer is None:
            return
        log_eval_examples(self.writer, step, emb, shardset, split, local_share)

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
                 for score in SCORES for metric, value in results.get(score, {}).items()}
        self.writer.add_hparams(flat, final, run_name=".")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            for writer in [self.writer, *self._score_writers.values()]:
                writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            for writer in [self.writer, *self._score_writers.values()]:
                writer.close()
