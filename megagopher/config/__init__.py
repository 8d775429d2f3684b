"""The run configuration: typed sections (schema.py, model.py), reading and writing them (loading.py),
every rule in one place (validate.py), and the key reference (reference.py)."""
from .fields import ConfigError
from .loading import from_tables, load_config, parse_overrides, parse_value, to_tables, to_toml
from .model import GPTConfig
from .schema import (SECTIONS, CheckpointConfig, DataConfig, JobConfig, OptimizerConfig, ParallelConfig,
                     RunConfig, StageConfig, TrainingConfig, check_value, coerce)
from .validate import validate

__all__ = ["ConfigError", "load_config", "parse_overrides", "parse_value", "to_toml", "to_tables", "from_tables",
           "GPTConfig", "JobConfig", "ParallelConfig", "TrainingConfig", "OptimizerConfig",
           "DataConfig", "CheckpointConfig", "RunConfig", "StageConfig", "SECTIONS", "coerce", "check_value",
           "validate"]
