"""Command line (also installed as `hier-shards`):

    python -m shards build --source builtin|emoji --out DIR ...   build a shard set
    python -m shards check DIR                                     decode every sample, check it against the manifest
    python -m shards stats DIR                                     sizes, counts and label statistics
"""
from __future__ import annotations

import argparse
import sys

from shards.build import add_build_command
from shards.check import ShardSetError, add_check_command
from shards.concepts import PipelineError
from shards.emoji_corpus import EmojiSourceError
from shards.stats import add_stats_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hier-shards", description="Build and check WebDataset shard sets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_build_command(commands)
    add_check_command(commands)
    add_stats_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileExistsError, PipelineError, EmojiSourceError, ShardSetError) as e:
        # a refusal the user can act on: the message, not a traceback
        print(f"hier-shards: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
