"""`python -m trainer.evaluate`: evaluate a run's checkpoint on a split (the code is in trainer.eval.evaluation, the
command line in trainer.eval.evaluate_args)."""
import sys

from trainer.eval.evaluate_args import build_parser
from usercli import exit_if_help

if __name__ == "__main__":  # help answered before the import below, which loads torch and DeepSpeed (seconds)
    exit_if_help(build_parser, sys.argv[1:])

from trainer.eval.evaluation import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
