"""Trainer for hierarchical image-text embeddings: config -> data -> model -> loss -> engine, eval beside."""
from trainer.observe import quiet as _quiet

_quiet.install()  # before any entry point imports DeepSpeed; see trainer/observe/quiet.py for what and why
