"""`python -m trainer.universal`: convert a checkpoint for another world size (the code is in
trainer.engine.universal, the command line in trainer.engine.universal_args)."""
import sys

from trainer.engine.universal_args import build_parser
from usercli import exit_if_help

if __name__ == "__main__":  # help answered before the import below, which loads torch and DeepSpeed (seconds)
    exit_if_help(build_parser, sys.argv[1:])

from trainer.engine.universal import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
