"""`python -m trainer.retrieve`: export a FAISS index, query it, serve a search page (the code is in
trainer.retrieval.commands, the command line in trainer.retrieval.retrieve_args)."""
import sys

from trainer.retrieval.retrieve_args import build_parser
from usercli import exit_if_help

if __name__ == "__main__":  # help answered before the import below, which loads torch and DeepSpeed (seconds)
    exit_if_help(build_parser, sys.argv[1:])

from trainer.retrieval.commands import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
