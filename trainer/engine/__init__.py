"""The DeepSpeed engine (ZeRO config, optimizer, schedule), its checkpoints, and their conversion to
another world size. Collectives stay in trainer.distributed."""
