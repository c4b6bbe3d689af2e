"""icl_core: the executable book of "In-context Learning and Induction Heads" (Olsson et al., 2022)."""
from .config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig, icl_indices

__all__ = ["ConfigError", "DataConfig", "ModelConfig", "RunConfig", "TrainConfig", "icl_indices"]
