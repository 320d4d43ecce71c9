"""Transformer-XL relative attention (Dai et al. 2019, section 3.3), efficient and reference.

For a query at absolute position i and a key at absolute position j (distance d = i - j >= 0):

    score(i, j) = (q_i + u) . k_j  +  (q_i + v) . r_d          (terms a+c and b+d of the paper)

where r_d = W_{k,R} R_d is the projected sinusoidal embedding of the distance. Queries are the N
tokens of the current segment, keys the M memory tokens followed by the N segment tokens (K = M + N):
query row i sits at absolute position M + i.

`relative_attention` computes the b+d term as one (N, K) matmul against the K distances K-1 ... 0 and
re-indexes it with the relative shift (pad one zero column, reinterpret the buffer): one extra copy of
the score matrix, no (N, K, D) tensor of per-pair embeddings. The softmax and the value product then go
through scaled_dot_product_attention with the b+d term (and the mask) as its additive bias.
`relative_attention_reference` builds the same scores pair by pair from the formula: O(N K) dot products
in Python-indexed form, for tests only.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sinusoid_distances(klen: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """R for the distances klen-1, klen-2, ..., 0 (that order: the relative shift expects it), (klen, dim).
    Dai et al.'s layout: sines in the first half of the channels, cosines in the second."""
    if dim % 2:
        raise ValueError(f"relative sinusoid embeddings need an even model.d_model, got {dim}")
    pos = torch.arange(klen - 1, -1, -1, device=device, dtype=torch.float32)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32) / dim))
    angles = pos[:, None] * inv_freq[None]
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype)


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """(..., N, K) scores whose column c is distance K-1-c  ->  (..., N, K) whose column j is key j, for
    query row i at absolute position K-N+i: out[i, j] = x[i, j + N-1-i]. Entries with j > K-N+i (keys in
    the query's future) come from the next row or the pad and are garbage: the causal mask removes them."""
    *lead, n, k = x.shape
    padded = F.pad(x, (1, 0))  # (..., N, K+1)
    return padded.view(*lead, k + 1, n)[..., 1:, :].reshape(*lead, n, k)


def causal_memory_mask(n: int, mem: int, device=None) -> torch.Tensor:
    """(N, M+N) bool, True = may attend: every memory slot, and the segment up to the query itself."""
    return torch.ones(n, mem + n, dtype=torch.bool, device=device).tril(diagonal=mem)


def relative_attention(q, k, v, r, u, vb, attn_mask=None, dropout_p: float = 0.0):
    """q: (B, H, N, D); k, v: (B, H, K, D) (memory then segment); r: (H, K, D) for distances K-1 ... 0;
    u, vb: (H, D). attn_mask: (N, K) or broadcastable bool, True = may attend; None = causal over memory +
    segment. Returns (B, H, N, D)."""
    n, klen, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if r.shape[-2] != klen:
        raise ValueError(f"relative embeddings cover {r.shape[-2]} distances, keys are {klen}")
    scale = 1.0 / math.sqrt(d)
    bd = rel_shift(torch.matmul(q + vb[:, None], r.transpose(-1, -2)))  # (B, H, N, K)
    if attn_mask is None:
        attn_mask = causal_memory_mask(n, klen - n, q.device)
    bias = (bd * scale).masked_fill(~attn_mask, float("-inf"))
    return F.scaled_dot_product_attention(q + u[:, None], k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


def relative_scores(q, k, r, u, vb):
    """The un-normalised scores (a+c) + (b+d) of relative_attention, (B, H, N, K), -inf in each query's
    future: what the attention's softmax reads (scaled by 1/sqrt(D)). For tests and inspection."""
    n, klen = q.shape[-2], k.shape[-2]
    ac = torch.matmul(q + u[:, None], k.transpose(-1, -2))
    bd = rel_shift(torch.matmul(q + vb[:, None], r.transpose(-1, -2)))
    return (ac + bd).masked_fill(~causal_memory_mask(n, klen - n, q.device), float("-inf"))


def relative_scores_reference(q, k, r_fn, u, vb):
    """The un-normalised scores of the formula, pair by pair: (B, H, N, K); r_fn(d) -> (H, D) is the
    projected embedding of distance d. Pairs in a query's future get -inf."""
    n, klen = q.shape[-2], k.shape[-2]
    mem = klen - n
    b, h = q.shape[:2]
    scores = torch.full((b, h, n, klen), float("-inf"), dtype=q.dtype, device=q.device)
    for i in range(n):
        for j in range(mem + i + 1):
            dist = mem + i - j
            rd = r_fn(dist)  # (H, D)
            ac = ((q[:, :, i] + u) * k[:, :, j]).sum(-1)
            bd = ((q[:, :, i] + vb) * rd).sum(-1)
            scores[:, :, i, j] = ac + bd
    return scores


def relative_attention_reference(q, k, v, r, u, vb, attn_mask=None):
    """relative_attention by the naive construction: explicit per-pair distances, exact softmax."""
    klen = k.shape[-2]
    scores = relative_scores_reference(q, k, lambda dist: r[:, klen - 1 - dist], u, vb) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), v)
