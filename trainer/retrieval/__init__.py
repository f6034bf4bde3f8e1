"""A retrieval product of its own: export a FAISS index of a run's vectors, query it, serve a search page."""
