"""Export a run's fp32 weights (ZeRO partitions gathered, as DeepSpeed's zero_to_fp32) to one file.

    python -m trainer.export --run runs/builtin --out model.pt
    python -m trainer.export --run runs/builtin --checkpoint step0000200 --out model.pt

No process group and no GPU: the checkpoint files are read directly (the last complete checkpoint by
default; an incomplete or truncated one is refused naming the file). model.pt holds {"state_dict" (fp32
tensors), "step", "tag", "run", "config", "concat_weight"} and loads with torch.load(weights_only=True); a new run
starts from it with model.init_from=model.pt, on any number of ranks. "concat_weight" is the concatenation's mix the
run scores with ({"local_share", "local_score_weight", "source"}: trainer.eval.concat_weight; None without a local
space): a run started from the file under model.local_score_weight=auto starts with it.
"""
from __future__ import annotations

from usercli import DefaultsHelpFormatter, OneLineParser

PROG = "python -m trainer.export"


def build_parser() -> OneLineParser:
    """The parser of `python -m trainer.export` (no torch: `--help` answers at once)."""
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--run", required=True, help="the run folder (run.out_dir)")
    parser.add_argument("--checkpoint", default="latest", help="checkpoint tag in RUN/checkpoints, or latest")
    parser.add_argument("--out", required=True, help="file to write, e.g. model.pt (its folder must exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    return parser
