"""Trainer for hierarchical image-text embeddings: config -> data -> model -> loss -> engine, eval beside."""
