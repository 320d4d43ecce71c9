"""Shared nn.Modules from which every model is assembled. Plain PyTorch: no Lightning, no Hydra."""
from zoo.blocks.attention import Attention
from zoo.blocks.block import Block
from zoo.blocks.cores import CORES, AttentionCore, build_core, check_core, compatible_cores, register_core
from zoo.blocks.ffn import MLP, SwiGLU, build_ffn
from zoo.blocks.norms import LayerNorm, RMSNorm, build_norm
from zoo.blocks.positions import LearnedPositions, RotaryEmbedding, SinusoidalPositions

import zoo.blocks.sparse_cores  # noqa: F401  (registers sliding_window, longformer, bigbird, sparse_strided)
import zoo.blocks.linear_cores  # noqa: F401  (registers performer, linear)
import zoo.blocks.lsh_core  # noqa: F401  (registers lsh)

__all__ = [
    "Attention", "AttentionCore", "Block", "CORES", "LayerNorm", "LearnedPositions", "MLP", "RMSNorm",
    "RotaryEmbedding", "SinusoidalPositions", "SwiGLU", "build_core", "build_ffn", "build_norm", "check_core",
    "compatible_cores", "register_core",
]
