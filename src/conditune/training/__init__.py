"""Speech LLM training: configuration, loop, checkpoints."""

from conditune.training.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "load_train_config", "train"]


def __getattr__(name):
    if name == "train":
        from conditune.training.trainer import train

        return train
    raise AttributeError(name)
