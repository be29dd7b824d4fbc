"""DeepSpeed training of the diffusion transformers on latent shards."""

from mdt.train.config import TrainConfig, resolve_config
from mdt.train.loop import TrainingError, TrainResult, train

__all__ = ["TrainConfig", "TrainResult", "TrainingError", "resolve_config", "train"]
