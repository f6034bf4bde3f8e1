"""The hierarchical embedder and its towers: image encoders (small CNN, region features, EfficientNet-Lite0),
text encoders (BiGRU, transformers), pooling and the global and local embedding heads."""
