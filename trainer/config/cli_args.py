"""The command line of trainer.train: options and `section.key=value` overrides in any order.

    python -m trainer.train --config configs/builtin.yaml train.steps=200 --resume latest loss.labels=none
    python -m trainer.train train.steps=200 --config configs/builtin.yaml      (the same: order is free)

`--help` lists every config key with its type and default (trainer.config.help, generated from the typed tree).
Later overrides of the same key win; `--resume X` is `run.resume=X`, whatever its place.

Also the launch scripts' preflight, so that a bad config is refused once, in one line, before a launcher starts
any rank (a refusal inside torchrun's ranks ends as its multi-line failure report instead):
    python -m trainer.train_args --config CONFIG [ARGS...]      exit 0: fine; 2: refused (one line)
It imports no torch and no DeepSpeed (about 0.2 s).
"""
from __future__ import annotations

import argparse
import sys

from trainer.config import Config, ConfigError, load_config
from trainer.config.help import config_keys_help
from usercli import OneLineParser, cli_main
from usercli.options import int_in

PROG = "python -m trainer.train"


class _TrainParser(OneLineParser):
    """The list of config keys is the help's epilog, made only when help is printed: generating it reads the
    schema's source (about 0.2 s), which a run that parses its arguments has no use for."""

    def format_help(self) -> str:
        self.epilog = config_keys_help()
        return super().format_help()


def build_parser(description: str = "") -> OneLineParser:
    parser = _TrainParser(prog=PROG, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
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


def parse_args(argv: list[str] | None, description: str = "") -> argparse.Namespace:
    parser = build_parser(description)
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
