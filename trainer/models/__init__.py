"""The hierarchical embedder and its parts, one module each: typed configs (configs), image towers (small CNN,
region features, EfficientNet-Lite0; image_towers), text towers (BiGRU in gru_text, transformers in hf_text, the
configured one and GloVe in text_encoders), pooling (GPO, mean), heads, and the embedder that joins them."""
