"""`python -m trainer.train_args`: check a train command line before a launcher starts any rank (the code is in
trainer.config.cli_args)."""
import sys

from trainer.config.cli_args import main

if __name__ == "__main__":
    sys.exit(main())
