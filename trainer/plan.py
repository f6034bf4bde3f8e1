"""`python -m trainer.plan`: memory plan of a config per rank before a launch (the code is in trainer.tools.plan)."""
import sys

from trainer.tools.plan import main

if __name__ == "__main__":
    sys.exit(main())
