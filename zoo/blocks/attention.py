"""Multi-head attention wiring: projections (MHA / GQA / MQA, optional shared QK), RoPE, KV cache.

The math lives in the core (zoo.blocks.cores -> kernels); this module only shapes tensors.
"""
from __future__ import annotations

import torch.nn as nn

from zoo.blocks.cores import build_core
from zoo.blocks.positions import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.shared_qk = cfg.shared_qk
        # one fused projection: a single matmul for q, k, v (k omitted when shared with q)
        n_out = (self.n_heads + (0 if self.shared_qk else self.n_kv_heads) + self.n_kv_heads) * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, n_out, bias=cfg.bias)
        self.out = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=cfg.bias)
        self.rope = RotaryEmbedding(self.head_dim, cfg.rope_base) if cfg.position == "rope" else None
        options = {k: v for k, v in cfg.attention.items() if k != "core"}
        self.core = build_core(cfg.attention["core"], causal=cfg.causal, dropout=cfg.attn_dropout, **options)
        self.core.setup(cfg)

    def forward(self, x, positions, key_padding_mask=None, cache: dict | None = None, context: dict | None = None):
        b, n, _ = x.shape
        hd = self.head_dim
        sizes = [self.n_heads * hd] + ([] if self.shared_qk else [self.n_kv_heads * hd]) + [self.n_kv_heads * hd]
        parts = self.qkv(x).split(sizes, dim=-1)
        q = parts[0].view(b, n, self.n_heads, hd).transpose(1, 2)
        k = q if self.shared_qk else parts[1].view(b, n, self.n_kv_heads, hd).transpose(1, 2)
        v = parts[-1].view(b, n, self.n_kv_heads, hd).transpose(1, 2)
        if self.rope is not None:
            q, k = self.rope(q, positions), self.rope(k, positions)
        # the core owns the cache (GQA/MQA keep only n_kv_heads of keys/values in it)
        context = {**(context or {}), "hidden": x, "positions": positions}
        y = self.core(q, k, v, key_padding_mask=key_padding_mask, cache=cache, context=context)
        return self.out(y.transpose(1, 2).reshape(b, n, self.n_heads * hd))
