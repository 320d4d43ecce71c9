"""Position-wise feed-forward networks: the GELU MLP (GPT-2, BERT) and SwiGLU (Shazeer 2020)."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F

FFNS = ("mlp", "swiglu", "moe")  # moe: zoo.blocks.moe.MoE, built by the block from the model config
ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


def activation(name: str):
    if name == "gelu":
        return nn.GELU()
    if name == "gelu_tanh":  # GPT-2's "gelu_new"
        return nn.GELU(approximate="tanh")
    if name == "relu":
        return nn.ReLU()
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"activation={name!r}; valid choices: {', '.join(ACTIVATIONS)}")


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "gelu", bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.act = activation(act)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.proj(self.act(self.fc(x))))


class SwiGLU(nn.Module):
    """proj(silu(gate(x)) * up(x)); names follow LLaMA/Mixtral's w1 (gate), w3 (up), w2 (down)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False, dropout: float = 0.0):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(hidden, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        return self.dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


def build_ffn(kind: str, dim: int, hidden: int, act: str, bias: bool, dropout: float) -> nn.Module:
    if kind == "mlp":
        return MLP(dim, hidden, act, bias, dropout)
    if kind == "swiglu":
        return SwiGLU(dim, hidden, bias, dropout)
    if kind == "moe":
        raise ValueError("ffn='moe' needs the model config (experts, top-k): build it with MoE.from_config(cfg)")
    raise ValueError(f"ffn={kind!r}; valid choices: {', '.join(FFNS)}")
