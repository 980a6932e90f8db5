"""Typed run configuration: the schema (schema.py), presets and dotted overrides (load.py) built
along the schema's types (build.py), and the checks types alone cannot express (validate.py,
pool_sizes.py). Imports run one way: schema <- pool_sizes <- validate <- load <- here. `validate`
stays a module name here: load_config and with_values are what check a config."""
from rlsr_ray.config.build import ConfigError, parse_override
from rlsr_ray.config.load import load_config, preset_names, with_values
from rlsr_ray.config.schema import (AlgoConfig, Config, DataConfig, EvalConfig, LoraConfig, ModelConfig, PoolConfig,
                                    PoolsConfig, RayConfig, RewardConfig, RewardServiceConfig, RewardTerm,
                                    RolloutConfig, RunConfig, SftConfig, TrainConfig, pool_device,
                                    reference_in_learner, uses_weight_route)

__all__ = ["AlgoConfig", "Config", "ConfigError", "DataConfig", "EvalConfig", "LoraConfig", "ModelConfig",
           "PoolConfig", "PoolsConfig", "RayConfig", "RewardConfig", "RewardServiceConfig", "RewardTerm",
           "RolloutConfig", "RunConfig", "SftConfig", "TrainConfig", "load_config", "parse_override",
           "pool_device", "preset_names", "reference_in_learner", "uses_weight_route", "with_values"]
