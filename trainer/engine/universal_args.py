"""A ZeRO 1-3 checkpoint converted to DeepSpeed's universal checkpoint format, to resume on another world size.

ZeRO partitions the fp32 master weights and the Adam moments by rank, so a checkpoint written by 16 ranks cannot
be loaded by 8 as it is. DeepSpeed's universal format holds every parameter whole (its fp32 value, exp_avg,
exp_avg_sq and step, one folder per parameter); an engine whose config has "checkpoint": {"load_universal": true}
loads it on any world size, each rank taking its own partition.

`--resume latest` on another world size does the conversion itself (trainer.engine.universal.prepare_resume): rank 0
converts CKPT/stepNNN into CKPT/universal/stepNNN while the other ranks wait, then every rank loads it. To
convert beforehand (the conversion runs in one process, without a process group; on a big model it is worth
doing before the job starts, so that no rank waits on it):

    python -m trainer.universal --run RUN                    # the checkpoint `latest` names
    python -m trainer.universal --run RUN --tag step0000120

A conversion counts only once its own marker (complete.json: files and sizes, plus the source checkpoint's file
list) is written; a folder without one (a killed conversion) or made from another checkpoint of the same name is
converted again. The folder goes when its source checkpoint is pruned.
"""
from __future__ import annotations

from usercli import DefaultsHelpFormatter, OneLineParser

PROG = "python -m trainer.universal"


def build_parser() -> OneLineParser:
    """The parser of `python -m trainer.universal` (no torch: `--help` answers at once)."""
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--run", required=True, help="the run's out_dir (its checkpoints/ folder is used)")
    parser.add_argument("--tag", default="latest", help="latest or a checkpoint tag, e.g. step0000120")
    return parser
