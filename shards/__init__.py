"""Building and checking WebDataset shard sets (format: DESIGN.md section 3)."""
