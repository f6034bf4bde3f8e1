"""`python -m trainer.export`: write a run's fp32 weights to one file (the code is in trainer.tools.export)."""
import sys

from trainer.tools.export import main

if __name__ == "__main__":
    sys.exit(main())
