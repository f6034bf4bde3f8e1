"""`python -m trainer.universal`: convert a checkpoint for another world size (the code is in
trainer.engine.universal)."""
import sys

from trainer.engine.universal import main

if __name__ == "__main__":
    sys.exit(main())
