"""Two-stage LLaViT training (``llavit-train`` / ``python -m llavit_kernels.train``)."""

from .evaluate import evaluate_synthetic
from .trainer import TrainConfig, latest_checkpoint, load_checkpoint, save_checkpoint, train

__all__ = ["TrainConfig", "train", "save_checkpoint", "load_checkpoint", "latest_checkpoint", "evaluate_synthetic"]
