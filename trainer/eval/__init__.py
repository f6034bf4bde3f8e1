"""Evaluation: embedding a split, retrieval metrics (recall, rSum, plausible-match precision), ground truth,
opening a finished run."""
