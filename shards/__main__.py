"""Command line: `python -m shards build ...` (also installed as `hier-shards`)."""
from __future__ import annotations

import argparse
import sys

from shards.build import add_build_command
from shards.concepts import PipelineError
from shards.emoji_corpus import EmojiSourceError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hier-shards", description="Build WebDataset shard sets.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_build_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileExistsError, PipelineError, EmojiSourceError) as e:
        # a refusal the user can act on: the message, not a traceback
        print(f"hier-shards: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
