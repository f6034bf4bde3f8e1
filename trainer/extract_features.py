"""`python -m trainer.extract_features`: precompute grid features of a pretrained image encoder into a shard set
(the code is in trainer.tools.extract_features)."""
import sys

from trainer.tools.extract_features import main

if __name__ == "__main__":
    sys.exit(main())
