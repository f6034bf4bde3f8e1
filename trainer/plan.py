"""`python -m trainer.plan`: memory plan of a config per rank before a launch (the code is in trainer.tools.plan, the
command line in trainer.tools.plan_args)."""
import sys

from trainer.tools.plan_args import build_parser
from usercli import exit_if_help

if __name__ == "__main__":  # help answered before the import below, which loads torch and DeepSpeed (seconds)
    exit_if_help(build_parser, sys.argv[1:])

from trainer.tools.plan import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
