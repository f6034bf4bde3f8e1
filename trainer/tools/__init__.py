"""Tools around a run: the memory plan before a launch, fp32 weight export, and grid-feature extraction."""
