"""`python -m trainer.extract_features`: precompute grid features of a pretrained image encoder into a shard set
(the code is in trainer.tools.extract_features, the command line in trainer.tools.extract_features_args)."""
import sys

from trainer.tools.extract_features_args import build_parser
from usercli import exit_if_help

if __name__ == "__main__":  # help answered before the import below, which loads torch and DeepSpeed (seconds)
    exit_if_help(build_parser, sys.argv[1:])

from trainer.tools.extract_features import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
