"""`python -m trainer.export`: write a run's fp32 weights to one file (the code is in trainer.tools.export, the
command line in trainer.tools.export_args)."""
import sys

from trainer.tools.export_args import build_parser
from usercli import exit_if_help

if __name__ == "__main__":  # help answered before the import below, which loads torch and DeepSpeed (seconds)
    exit_if_help(build_parser, sys.argv[1:])

from trainer.tools.export import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
