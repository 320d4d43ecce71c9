"""Trunks that stack blocks. Plain PyTorch: no Lightning, no Hydra."""
from zoo.models.config import ModelConfig
from zoo.models.registry import build_model, model_config
from zoo.models.transformer import Transformer, ZooModel

__all__ = ["ModelConfig", "Transformer", "ZooModel", "build_model", "model_config"]
