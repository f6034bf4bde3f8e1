"""`python -m trainer.train`: train a run, then evaluate it (the code is in trainer.training.loop, the command line in
trainer.config.cli_args)."""
import sys

from trainer.config.cli_args import build_parser
from usercli import exit_if_help

if __name__ == "__main__":  # help answered before the import below, which loads torch and DeepSpeed (seconds)
    exit_if_help(build_parser, sys.argv[1:])

from trainer.training.loop import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
