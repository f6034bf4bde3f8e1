"""Evaluate a run's checkpoint on a split: recall at K per score, rSum and plausible-match precision, printed and
written to RUN/eval/<split>.json. Runs in one process or on every rank of a launch (each embeds its share).

Evaluate a finished run's last checkpoint on its test split:
    python -m trainer.evaluate --run runs/builtin --split test
Another checkpoint, with a config override:
    python -m trainer.evaluate --run runs/builtin --checkpoint step0000200 data.eval_batch_size=64
"""
from __future__ import annotations

import argparse

from usercli import DefaultsHelpFormatter, OneLineParser

PROG = "python -m trainer.evaluate"


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    """--run, --checkpoint, --split: which run, checkpoint and split a command reads (evaluate, retrieve export)."""
    parser.add_argument("--run", required=True, help="run folder written by trainer.train (has config.yaml)")
    parser.add_argument("--checkpoint", default="latest", help="checkpoint tag in RUN/checkpoints, or latest")
    parser.add_argument("--split", default=None, help="split to read (default: the config's test split)")


def build_parser() -> OneLineParser:
    """The parser of `python -m trainer.evaluate` (no torch: `--help` answers at once)."""
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=DefaultsHelpFormatter)
    add_checkpoint_arguments(parser)
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="overrides of the run's config (as trainer.train takes them)")
    return parser
