"""`python -m trainer.evaluate`: evaluate a run's checkpoint on a split (the code is in trainer.eval.evaluation)."""
import sys

from trainer.eval.evaluation import main

if __name__ == "__main__":
    sys.exit(main())
