"""Training: contrastive CLIP on clipmech mixtures (CPU, GPU, torchrun DDP) and the supervised baseline."""
from clipmech.train.config import DEFAULTS, load_config
from clipmech.train.trainer import NonFiniteLossError, train

__all__ = ["DEFAULTS", "NonFiniteLossError", "load_config", "train"]
