"""The typed config tree: its sections and their rules, reading YAML with `base:` chains and command-line
overrides, the `--help` listing of every key, and the train command's argument preflight."""
from trainer.config.schema import (
    BASE_KEY,
    RENAMED_KEYS,
    Config,
    ConfigError,
    DataConfig,
    EngineConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
    check_output_folder,
    check_shard_set_files,
    load_config,
    load_run_config,
    read_config_tree,
    save_config,
    validate,
)

__all__ = [
    "BASE_KEY", "Config", "ConfigError", "DataConfig", "EngineConfig", "LossConfig", "ModelConfig", "OptimConfig",
    "RENAMED_KEYS", "RunConfig", "TrainConfig", "check_output_folder", "check_shard_set_files", "load_config",
    "load_run_config", "read_config_tree", "save_config", "validate",
]
