"""Transformer-XL (Dai et al. 2019): segment-level recurrence with a per-layer memory, relative positions.

Each layer attends over [memory; segment], where its memory holds that layer's *inputs* for the last
`mem_len` positions of earlier segments, stored with gradients stopped. Positions enter only through the
relative attention terms (kernels.relative_attention): no absolute position table, so the trunk runs on
any number of positions and a memory may be longer at evaluation than in training.

The trunk is selected by `model.recurrence=xl` (ZooModel builds it instead of the generic Transformer);
the memory travels in the `cache` argument as an XLMemory, which the trunk updates in place: the same
call shape as the KV cache of the other decoders, so ZooModel.generate drives both.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.relative_attention import causal_memory_mask, relative_attention, sinusoid_distances
from zoo.blocks.ffn import build_ffn
from zoo.blocks.moe import MoE
from zoo.blocks.norms import build_norm


class XLMemory:
    """The recurrent state: one (batch, <= mem_len, d_model) tensor per layer, or None before the first
    segment. Tensors are detached: gradients stop at the segment boundary (the paper's SG(.))."""

    def __init__(self, mem_len: int):
        if mem_len < 0:
            raise ValueError(f"memory length must be >= 0, got {mem_len}")
        self.mem_len = mem_len
        self.layers: list[torch.Tensor] | None = None

    def reset(self) -> None:
        self.layers = None

    def __len__(self) -> int:
        return 0 if self.layers is None else self.layers[0].shape[1]

    def update(self, inputs: list[torch.Tensor]) -> None:
        if self.mem_len == 0:
            return
        old = self.layers or [None] * len(inputs)
        self.layers = [(h if m is None else torch.cat([m, h], dim=1))[:, -self.mem_len:].detach()
                       for m, h in zip(old, inputs)]

    def state(self) -> dict:
        return {"mem_len": self.mem_len, "layers": None if self.layers is None else [m.cpu() for m in self.layers]}

    def load(self, state: dict, device=None) -> None:
        self.mem_len = state["mem_len"]
        layers = state["layers"]
        self.layers = None if layers is None else [m.to(device) for m in layers]


class RelativeAttention(nn.Module):
    """Projections for q, k, v from [memory; segment], W_{k,R} for the distance embeddings, and the u / v
    biases (one pair per layer, as in the released code's `untie_r=True` and HF TransfoXL)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        inner = cfg.n_heads * cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * inner, bias=cfg.bias)
        self.r_net = nn.Linear(cfg.d_model, inner, bias=False)
        self.out = nn.Linear(inner, cfg.d_model, bias=cfg.bias)
        self.u = nn.Parameter(torch.randn(cfg.n_heads, cfg.head_dim) * cfg.init_std)
        self.v = nn.Parameter(torch.randn(cfg.n_heads, cfg.head_dim) * cfg.init_std)
        self.attn_dropout = cfg.attn_dropout

    def forward(self, x, mem_x, pos, attn_mask):
        """x: (B, N, d) the (normalised) segment; mem_x: (B, M, d) or None; pos: (M+N, d) embeddings of the
        distances M+N-1 ... 0."""
        b, n, _ = x.shape
        h, hd = self.n_heads, self.head_dim
        cat = x if mem_x is None else torch.cat([mem_x, x], dim=1)
        klen = cat.shape[1]
        # queries only for the segment (the memory's were computed with its own segment): split the fused weight
        w_q, w_kv = self.qkv.weight.split([h * hd, 2 * h * hd])
        b_q, b_kv = self.qkv.bias.split([h * hd, 2 * h * hd]) if self.qkv.bias is not None else (None, None)
        q = F.linear(x, w_q, b_q).view(b, n, h, hd).transpose(1, 2)
        k, v = F.linear(cat, w_kv, b_kv).split(h * hd, dim=-1)
        k = k.view(b, klen, h, hd).transpose(1, 2)
        v = v.view(b, klen, h, hd).transpose(1, 2)
        r = self.r_net(pos.to(x.dtype)).view(klen, h, hd).transpose(0, 1)
        y = relative_attention(q, k, v, r, self.u.to(q.dtype), self.v.to(q.dtype), attn_mask,
                               self.attn_dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, h * hd))


class XLBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.prenorm = cfg.norm_position == "pre"
        self.norm1 = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = RelativeAttention(cfg)
        self.norm2 = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.moe = cfg.ffn == "moe"
        self.ffn = MoE.from_config(cfg) if self.moe else build_ffn(cfg.ffn, cfg.d_model, cfg.d_ff, cfg.activation,
                                                                   cfg.bias, cfg.dropout)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x, mem, pos, attn_mask):
        if self.prenorm:
            # the memory holds raw layer inputs: it is normalised with the segment, as in a one-pass run
            a = self.attn(self.norm1(x), None if mem is None else self.norm1(mem), pos, attn_mask)
            x = x + self.dropout(a)
            return x + self.ffn(self.norm2(x))
        x = self.norm1(x + self.dropout(self.attn(x, mem, pos, attn_mask)))  # Dai et al.'s post-norm layout
        return self.norm2(x + self.ffn(x))


class TransformerXL(nn.Module):
    """Embeddings -> XL blocks (each with its memory) -> final norm. Same call shape as zoo's Transformer."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = None  # positions are relative, inside attention
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(XLBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = build_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias) if cfg.final_norm else None

    def new_memory(self, mem_len: int | None = None) -> XLMemory:
        return XLMemory(self.cfg.mem_len if mem_len is None else mem_len)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, start_pos: int = 0, cache=None,
                global_attention_mask=None, segment_mask=None):
        """cache: an XLMemory (read, then updated in place) or None (no memory, nothing kept).
        segment_mask: (N, M+N) bool replacing the causal mask (tests: one pass with the recurrence's mask).
        start_pos is accepted for the shared call shape and unused: positions are relative."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("model.recurrence=xl reads contiguous streams and takes no padding mask "
                             "(use data=streams)")
        if cache is not None and not isinstance(cache, XLMemory):
            raise TypeError(f"model.recurrence=xl expects an XLMemory as cache, got {type(cache).__name__}")
        b, n = input_ids.shape
        mems = cache.layers if cache is not None else None
        if mems is not None and mems[0].shape[0] != b:
            raise ValueError(f"memory holds {mems[0].shape[0]} streams, the batch has {b}: reset it "
                             "(XLMemory.reset) when the batch size changes")
        m = 0 if mems is None else mems[0].shape[1]
        x = self.drop(self.tok_emb(input_ids))
        pos = sinusoid_distances(m + n, self.cfg.d_model, device=x.device)
        mask = segment_mask if segment_mask is not None else causal_memory_mask(n, m, x.device)
        inputs = []
        for i, block in enumerate(self.blocks):
            inputs.append(x)
            x = block(x, None if mems is None else mems[i], pos, mask)
        if cache is not None:
            cache.update(inputs)
        return self.norm(x) if self.norm is not None else x


@torch.no_grad()
def stream_loss(net, tokens: torch.Tensor, seg_len: int, mem_len: int) -> float:
    """Mean next-token cross-entropy (nats) over streams `tokens` (B, T), read segment by segment with a
    memory of `mem_len` positions. mem_len=0 scores each segment alone: a model whose context is the
    segment. For memory vs evaluation-length studies (docs/transformer_xl.md)."""
    was_training = net.training
    net.eval()
    memory = net.trunk.new_memory(mem_len)
    total, count = 0.0, 0
    for s in range(0, tokens.shape[1] - 1, seg_len):
        inp = tokens[:, s: s + seg_len]
        tgt = tokens[:, s + 1: s + seg_len + 1]
        inp = inp[:, : tgt.shape[1]]
        logits = net(inp, cache=memory)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 up, fp64 kept
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), tgt.flatten(), reduction="sum"))
        count += tgt.numel()
    net.train(was_training)
    return total / count
