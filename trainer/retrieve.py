"""`python -m trainer.retrieve`: export a FAISS index, query it, serve a search page (the code is in
trainer.retrieval.commands)."""
import sys

from trainer.retrieval.commands import main

if __name__ == "__main__":
    sys.exit(main())
