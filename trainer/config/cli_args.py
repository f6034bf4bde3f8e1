"""The command line of trainer.train: options and `section.key=value` overrides in any order.

    python -m trainer.train --config configs/builtin.yaml train.steps=200 --resume latest loss.labels=none
    python -m trainer.train train.steps=200 --config configs/builtin.yaml      (the same: order is free)

`--help` lists every config key with its type and default (trainer.config.help, generated from the typed tree).
Later overrides of the same key win; `--resume X` is `run.resume=X`, whatever its place.

Also the launch scripts' preflight, so that a bad config is refused once, in one line, before a launcher starts
any rank (a refusal inside torchrun's ranks ends as its multi-line failure report instead):
    python -m trainer.train_args --config CONFIG [ARGS...]      exit 0: fine; 2: refused (one line)
It imports no torch and no DeepSpeed (about 0.2 s), and so is `python -m trainer.train --help`.
"""
from __future__ import annotations

import argparse
import sys

from trainer.config import Config, ConfigError, load_config
from trainer.config.help import config_keys_help
from usercli import DefaultsHelpFormatter, OneLineParser, cli_main
from usercli.options import int_in

PROG = "python -m trainer.train"
DESCRIPTION = """Train a hierarchical (global + local) image-text embedding with DeepSpeed, streaming WebDataset shards.

One process, no launcher (CPU or one GPU):
    python -m trainer.train --config configs/builtin.yaml
    python -m trainer.train --config configs/builtin.yaml train.steps=200 loss.labels=shuffled
Resume a killed run from its last checkpoint:
    python -m trainer.train --config configs/builtin.yaml --resume latest
Start afresh in a run folder that holds an earlier run (its checkpoints/, tb/, eval/ are moved aside, not deleted):
    python -m trainer.train --config configs/builtin.yaml --overwrite
Several processes: any launcher that sets RANK/WORLD_SIZE/LOCAL_RANK (deepspeed, torchrun, srun); see launch/.

Outputs in run.out_dir: config.yaml (resolved), checkpoints/ (DeepSpeed, with `latest`), tb/ (TensorBoard),
eval/<split>.json (R@K per score), train_log.jsonl (the logged scalars).

Faults (each rank decides nothing alone: one all-reduce per step makes every rank take the same branch):
- SIGTERM or SIGUSR1 (SLURM's warning before the time limit): every rank writes a checkpoint at the next step
  boundary and exits 0; `--resume latest` continues from it. A rank waiting for data waits 10 s more at most:
  then one process checkpoints its last completed step (exit 0), else the run ends with one line and exit code
  128 + the signal's number. Exit code 2: a refused config, file or checkpoint (one line naming it); 130: Ctrl-C
  (the last complete checkpoint is kept).
- A loader worker that sends no batch within data.batch_timeout_s ends the run with one line naming it (exit 2).
- A step whose loss or gradient is not finite on any rank is skipped on all of them (no parameter or optimizer
  state changes); train.max_nonfinite_steps in a row stop the run, keeping the last checkpoint before them.
- Bad samples are skipped and counted per kind (TensorBoard data/bad/<kind>), logged one line each for the
  first 10 per worker, then as counts every 30 s; past data.max_bad_fraction of the samples read (judged in each
  loader worker once it has read data.bad_fraction_min_read, and over all ranks at each step), the run stops with
  one line naming the shard set (exit 2).
- The data position is in the checkpoint: per rank (data_rankNNNNN.pt) every loader worker's stream position (RNG
  state, shard position and byte offset, its shuffle buffer as byte ranges), so a resumed run reads the batches
  the uninterrupted run would have read at the cost of re-reading the buffers (logged: bytes and seconds), and on
  the same machine kind, world size, data.num_workers and engine.threads it ends with bit-identical parameters
  (tests/integration/test_faults.py), for data.resampled too. The loader's workers live for the whole run. Not
  reproduced: a resume on another world size or worker count (other shards per worker), timing scalars, and on
  GPUs any kernel or collective that sums in a varying order (then the runs agree to float rounding only).
"""


class _TrainParser(OneLineParser):
    """The list of config keys is the help's epilog, made only when help is printed: generating it reads the
    schema's source (about 0.2 s), which a run that parses its arguments has no use for."""

    def format_help(self) -> str:
        self.epilog = config_keys_help()
        return super().format_help()


def build_parser() -> OneLineParser:
    parser = _TrainParser(prog=PROG, description=DESCRIPTION, formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file, e.g. configs/builtin.yaml")
    parser.add_argument("--resume", default=None, metavar="latest|TAG",
                        help="continue from the run's checkpoint: latest or a tag (same as run.resume=...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run.out_dir that holds an earlier run: its checkpoints/, tb/, eval/ "
                             "and train_log.jsonl are moved aside into RUN/replaced-TIME/ (nothing is deleted)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (base files and overrides applied) and exit; starts nothing")
    parser.add_argument("--local_rank", type=int_in(0), default=None, help=argparse.SUPPRESS)  # the deepspeed launcher
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="config overrides, before or after the options (keys listed below)")
    return parser


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = build_parser()
    # intermixed: overrides may stand before, between and after --config / --resume / --print-config
    args = parser.parse_intermixed_args(argv)
    if args.resume is not None and ("=" in args.resume or not args.resume.strip()):
        parser.error(f"--resume takes latest or a checkpoint tag, got {args.resume!r}")
    if args.overwrite and args.resume is not None:
        parser.error("--overwrite starts the run afresh and --resume continues it: give one of them")
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"{item!r} is neither an option nor an override (section.key=value)")
    return args


def resolved_config(args: argparse.Namespace, check_paths: bool | None = None) -> Config:
    """The config the arguments name (ConfigError names the key). --print-config checks no paths: shards and
    checkpoints need not exist yet."""
    overrides = list(args.overrides) + ([f"run.resume={args.resume}"] if args.resume else [])
    return load_config(args.config, overrides, check_paths=not args.print_config if check_paths is None
                       else check_paths)


def _preflight(argv: list[str] | None) -> int:
    resolved_config(parse_args(argv), check_paths=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli_main(_preflight, argv, PROG)


__all__ = ["ConfigError", "build_parser", "parse_args", "resolved_config", "main"]

if __name__ == "__main__":
    sys.exit(main())
