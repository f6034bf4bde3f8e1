"""`python -m trainer.train`: train a run, then evaluate it (the code is in trainer.training.loop)."""
import sys

from trainer.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
