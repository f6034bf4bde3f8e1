"""The hierarchical objective: a global term, a local term supervised by lexical labels, and the label source."""
