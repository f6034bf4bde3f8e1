"""Command line (also installed as `hier-shards`):

    python -m shards build --source builtin|emoji|openmoji|... --out DIR   build a shard set
    python -m shards check DIR                                     decode every sample, check it against the manifest
    python -m shards stats DIR                                     sizes, counts and label statistics

Exit codes: 0 done; 1 `check` found problems (listed); 2 refused (the one line names the file or option);
130 interrupted (an interrupted build continues with `build ... --resume`).
"""
from __future__ import annotations

import sys

from shards.build import add_build_command
from shards.check import add_check_command
from shards.stats import add_stats_command
from usercli import OneLineParser, cli_main

PROG = "hier-shards"


def build_parser() -> OneLineParser:
    parser = OneLineParser(prog=PROG, description="Build and check WebDataset shard sets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_build_command(commands)
    add_check_command(commands)
    add_stats_command(commands)
    return parser


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


def main(argv: list[str] | None = None) -> int:
    # refusals (UserError: shards.sources.base.InputError, ShardSetError, PipelineError, ...) become one line
    return cli_main(_main, argv, PROG, interrupted_hint="an interrupted build continues with `build ... --resume`")


if __name__ == "__main__":
    sys.exit(main())
