"""Training by teacher forcing: corpora, token shards and the trainer."""

from arlm.train.trainer import TrainConfig, Trainer, TrainingError, saved_train_config

__all__ = ["TrainConfig", "Trainer", "TrainingError", "saved_train_config"]
