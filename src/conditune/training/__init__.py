"""Speech LLM training: configuration, the trainer, optimiser and schedule, checkpoints."""

from conditune.training.config import TrainConfig, load_train_config

__all__ = ["TrainConfig", "TrainResult", "Trainer", "load_train_config", "train"]


def __getattr__(name):
    if name in ("train", "Trainer", "TrainResult"):
        from conditune.training import trainer

        return getattr(trainer, name)
    raise AttributeError(name)
