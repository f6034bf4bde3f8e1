"""The hierarchical objective (hierarchical.py), composed of small parts built from the loss config: a global
term (global_terms.py), a local term supervised by lexical labels (local_terms.py), the label source
(labels.py), the shared view of a batch's pairs (pairs.py), and the one table that picks each part's class from
its config string (registry.py)."""
