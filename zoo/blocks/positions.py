"""Position schemes: learned absolute, sinusoidal absolute (added to embeddings), RoPE (applied to q, k), none."""
from __future__ import annotations

import math

import torch
import torch.nn as nn

POSITIONS = ("learned", "sinusoidal", "rope", "none")


class LearnedPositions(nn.Module):
    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len = max_len
        self.weight = nn.Parameter(torch.zeros(max_len, dim))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.weight[positions]


class SinusoidalPositions(nn.Module):
    """Vaswani et al. 2017: sin on even channels, cos on odd ones."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.max_len = max_len
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
        table = torch.zeros(max_len, dim)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
        self.register_buffer("table", table, persistent=False)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        return self.table[positions]


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al. 2021) in the half-split layout of GPT-NeoX/LLaMA/Mistral (rotate_half)."""

    def __init__(self, head_dim: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rope needs an even head dimension, got head_dim={head_dim}")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (batch, heads, seq, head_dim); positions: (seq,) or (batch, seq)."""
        angles = positions.float()[..., None] * self.inv_freq  # (..., seq, head_dim/2)
        if angles.dim() == 3:
            angles = angles[:, None]  # broadcast over heads
        cos = torch.cat([angles.cos(), angles.cos()], dim=-1)
        sin = torch.cat([angles.sin(), angles.sin()], dim=-1)
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat([-x2, x1], dim=-1)
        return (x.float() * cos + rotated * sin).to(x.dtype)


def check_position(kind: str) -> None:
    if kind not in POSITIONS:
        raise ValueError(f"position={kind!r}; valid choices: {', '.join(POSITIONS)}")


def build_absolute_positions(kind: str, max_len: int, dim: int) -> nn.Module | None:
    check_position(kind)
    if kind == "learned":
        return LearnedPositions(max_len, dim)
    if kind == "sinusoidal":
        return SinusoidalPositions(max_len, dim)
    return None  # rope lives in attention; none has no table
