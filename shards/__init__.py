"""Building and checking WebDataset shard sets (format: docs/design.md section 3)."""
