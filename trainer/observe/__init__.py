"""What a person watching a run sees: TensorBoard scalars and retrieval examples, progress bars, and the
library log lines that are silenced."""
