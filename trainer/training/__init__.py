"""The training loop: components built from the config, one optimizer step with its agreement between
ranks, and the loop that logs, evaluates, checkpoints and stops."""
