"""The transformer block: attention and FFN sub-layers with residuals, pre-norm or post-norm."""
from __future__ import annotations

import torch.nn as nn

from zoo.blocks.attention import Attention
from zoo.blocks.ffn import build_ffn
from zoo.blocks.moe import MoE
from zoo.blocks.norms import build_norm


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.prenorm = cfg.norm_position == "pre"
        self.norm1 = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = Attention(cfg)
        self.norm2 = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.moe = cfg.ffn == "moe"
        if self.moe:
            self.ffn = MoE.from_config(cfg)
        else:
            self.ffn = build_ffn(cfg.ffn, cfg.d_model, cfg.d_ff, cfg.activation, cfg.bias, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)
        # an optional cross-attention sub-layer between attention and FFN, set by the model that has one
        # (RETRO's chunked cross-attention): cross(x, context) -> x, its own norm and residual inside
        self.cross: nn.Module | None = None

    def forward(self, x, positions, key_padding_mask=None, cache=None, context=None):
        if self.prenorm:  # GPT-2, LLaMA: x + f(norm(x))
            x = x + self.dropout(self.attn(self.norm1(x), positions, key_padding_mask, cache, context))
            if self.cross is not None:
                x = self.cross(x, context)
            return x + self._ffn(self.norm2(x), key_padding_mask)
        # BERT: norm(x + f(x))
        x = self.norm1(x + self.dropout(self.attn(x, positions, key_padding_mask, cache, context)))
        if self.cross is not None:
            x = self.cross(x, context)
        return self.norm2(x + self._ffn(x, key_padding_mask))

    def _ffn(self, x, key_padding_mask):
        # the router's load statistics leave out padding tokens, so the MoE needs the mask
        return self.ffn(x, key_padding_mask) if self.moe else self.ffn(x)
