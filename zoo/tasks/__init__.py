"""LightningModules: the training objectives. The only part of `zoo` that imports Lightning."""
from zoo.tasks.base import NonFiniteLossError, ZooTask
from zoo.tasks.classification import SequenceClassification
from zoo.tasks.language_modeling import CausalLM, MaskedLM

__all__ = ["CausalLM", "MaskedLM", "NonFiniteLossError", "SequenceClassification", "ZooTask"]
