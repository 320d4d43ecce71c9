"""Sparse softmax attention in linear memory: a blocked kernel for CPU (and any device), flex_attention on CUDA.

Every sparse pattern in the zoo (sliding window, Longformer, BigBird, Sparse Transformer) is written as
(a) an element predicate `allowed(q_pos, k_pos)` that the dense reference and flex_attention's
mask_mod use, and (b) a block layout: for each query block, the key blocks that can hold allowed keys.
`blocked_attention` gathers only those key blocks, so scores are (N, K * block) instead of (N, N):
memory grows linearly with the sequence. It also returns the log-sum-exp of each row, so two partial
attentions over disjoint key sets merge exactly (`merge_partials`), which is how a pattern that is a
union of simpler ones (Longformer's band + global keys, Sparse Transformer's local + strided) is built.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

NEG_INF = float("-inf")


def expand_kv(q, k, v):
    """Repeat kv heads so that each query head has its own (GQA/MQA -> MHA layout)."""
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def pad_seq(x: torch.Tensor, n: int, dim: int = 2, value=0.0) -> torch.Tensor:
    """Pad `dim` of x up to length n (the core pads inside; the caller never sees the padding)."""
    extra = n - x.shape[dim]
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def dense_masked_attention(q, k, v, allowed: torch.Tensor, scale=None, return_lse: bool = False):
    """The test reference: explicit softmax over an (…, n_q, n_k) boolean mask, in float32.
    A row with no allowed key gives zeros (and lse = -inf)."""
    k, v = expand_kv(q, k, v)
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    acc = torch.promote_types(q.dtype, torch.float32)  # float32 at least; float64 stays float64
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(acc), k.to(acc)) * scale
    scores = scores.masked_fill(~allowed, NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v.to(acc)).to(q.dtype)
    return (out, lse) if return_lse else out


def merge_partials(o1, lse1, o2, lse2):
    """Softmax attention over the union of two disjoint key sets, from each set's output and log-sum-exp."""
    lse = torch.logaddexp(lse1, lse2)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    w1 = torch.exp(lse1 - safe)[..., None]
    w2 = torch.exp(lse2 - safe)[..., None]
    acc = torch.promote_types(o1.dtype, torch.float32)
    return (o1.to(acc) * w1 + o2.to(acc) * w2).to(o1.dtype), lse


def blocked_attention(q, k, v, kv_blocks: torch.Tensor, block_size: int, allowed=None, key_mask=None,
                      extra=None, scale=None, dropout_p: float = 0.0):
    """Softmax attention where query block i sees only key blocks kv_blocks[..., i, :].

    q: (B, H, N, D), k/v: (B, Hkv, N, D) with N a multiple of block_size.
    kv_blocks: (1 or H, N // block_size, K) long; -1 marks an unused slot. A block listed twice counts twice,
        so layouts must be duplicate-free (the pattern builders guarantee it).
    allowed: optional fn(q_pos (nb, bs, 1), k_pos (Hl, nb, 1, K*bs)) -> bool, the element predicate.
    key_mask: optional (B, N) bool, False = key never attended (padding).
    extra: optional (k_e, v_e, mask_e): keys every query may also see (Longformer's global tokens),
        k_e/v_e (B, H, G, D), mask_e (B, 1 or H, N, G) bool.
    Returns (out (B, H, N, D), lse (B, H, N)); fully masked rows give zeros and lse = -inf.
    """
    k, v = expand_kv(q, k, v)
    b, h, n, d = q.shape
    bs = block_size
    nb = n // bs
    if nb * bs != n:
        raise ValueError(f"sequence length {n} is not a multiple of block_size={bs} (the core pads first)")
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    hl, _, kk = kv_blocks.shape
    valid_slot = kv_blocks >= 0
    idx = kv_blocks.clamp(min=0)
    heads = torch.arange(h, device=q.device)[:, None, None] if hl > 1 else torch.zeros(1, 1, 1, dtype=torch.long,
                                                                                       device=q.device)
    kb, vb = k.view(b, h, nb, bs, d), v.view(b, h, nb, bs, d)
    if hl > 1:
        kg, vg = kb[:, heads, idx], vb[:, heads, idx]  # (B, H, nb, K, bs, D)
    else:
        kg, vg = kb[:, :, idx[0]], vb[:, :, idx[0]]
    kg, vg = kg.reshape(b, h, nb, kk * bs, d), vg.reshape(b, h, nb, kk * bs, d)
    qb = q.view(b, h, nb, bs, d)
    acc = torch.promote_types(q.dtype, torch.float32)  # softmax in float32 at least
    scores = torch.einsum("bhiqd,bhikd->bhiqk", qb, kg).to(acc) * scale

    k_pos = (idx[..., None] * bs + torch.arange(bs, device=q.device)).reshape(hl, nb, 1, kk * bs)
    ok = valid_slot[..., None].expand(hl, nb, kk, bs).reshape(hl, nb, 1, kk * bs)
    if allowed is not None:
        q_pos = torch.arange(n, device=q.device).view(nb, bs, 1)
        ok = ok & allowed(q_pos, k_pos)
    ok = ok[None]  # (1, Hl, nb, bs or 1, K*bs)
    if key_mask is not None:
        ok = ok & key_mask[:, k_pos.reshape(-1)].view(b, hl, nb, 1, kk * bs)
    scores = scores.masked_fill(~ok, NEG_INF)
    if extra is not None:
        k_e, v_e, mask_e = extra
        s_e = torch.einsum("bhiqd,bhgd->bhiqg", qb, k_e).to(acc) * scale
        s_e = s_e.masked_fill(~mask_e.reshape(b, mask_e.shape[1], nb, bs, -1), NEG_INF)
        scores = torch.cat([scores, s_e], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.masked_fill(torch.isinf(lse), 0.0)[..., None])
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    probs = probs.to(v.dtype)
    out = torch.einsum("bhiqk,bhikd->bhiqd", probs[..., : kk * bs], vg)
    if extra is not None:
        out = out + torch.einsum("bhiqg,bhgd->bhiqd", probs[..., kk * bs:], extra[1])
    return out.reshape(b, h, n, d), lse.reshape(b, h, n)


# ---------------------------------------------------------------------------------------------------------
# flex_attention (CUDA): the same predicates as a mask_mod, block masks cached per shape

_flex = None


def flex_available(x: torch.Tensor) -> bool:
    if not x.is_cuda:
        return False
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def flex_attention(q, k, v, block_mask, scale=None, return_lse=False):
    """torch's flex_attention, compiled once per process (uncompiled it runs a slow dense fallback)."""
    global _flex
    if _flex is None:
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention as fa
        # one graph per (length, pattern): a benchmark or a model with several cores needs more than 8
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _flex = torch.compile(fa, dynamic=False)
    gqa = q.shape[1] != k.shape[1]
    out = _flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa, return_lse=return_lse)
    return out


def make_block_mask(mask_mod, b, h, n_q, n_k, device):
    """Compiled on CUDA: built eagerly it would evaluate mask_mod over the whole (n_q, n_k) grid at once."""
    from torch.nn.attention.flex_attention import create_block_mask
    return create_block_mask(mask_mod, b, h, n_q, n_k, device=device, _compile=torch.device(device).type == "cuda")
