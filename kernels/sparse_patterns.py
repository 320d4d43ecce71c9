"""The sparse attention patterns: sliding window (optionally dilated), Longformer, BigBird, Sparse Transformer.

Each pattern has three implementations that compute the same thing:
- `impl="reference"`: dense softmax over an explicit (N, N) boolean mask. Tests only: quadratic memory.
- `impl="blocked"`: `blocked_attention` over the pattern's block layout. Linear memory, any device,
  differentiable everywhere (flex_attention has no CPU backward).
- `impl="flex"`: torch's flex_attention with a BlockMask built from the same predicate (CUDA).
`impl="auto"` takes flex on CUDA and blocked elsewhere. Sequences of any length work: each pattern pads
to its block size inside and masks the padding as keys, so padded positions never reach real ones.
"""
from __future__ import annotations

import copy
import math
from functools import lru_cache

import torch
import torch.nn.functional as F

from kernels.sparse_attention import (
    blocked_attention,
    dense_masked_attention,
    expand_kv,
    flex_attention,
    flex_available,
    make_block_mask,
    merge_partials,
    pad_seq,
)

IMPLS = ("auto", "reference", "blocked", "flex")
FLEX_BLOCK = 128  # flex_attention's tile: pad to it so that block masks are exact


def choose_impl(impl: str, q: torch.Tensor, dropout_p: float = 0.0) -> str:
    if impl not in IMPLS:
        raise ValueError(f"sparse attention impl={impl!r}; valid choices: {', '.join(IMPLS)}")
    if impl == "auto":
        # flex_attention has no dropout: a training step with attention dropout takes the blocked path
        return "flex" if flex_available(q) and dropout_p == 0.0 else "blocked"
    return impl


def _ceil(n: int, m: int) -> int:
    return -(-n // m) * m


def _real_keys(key_padding_mask, b: int, n: int, n_pad: int, device):
    """(B, n_pad) bool: real keys; the core's own padding is never real."""
    m = key_padding_mask if key_padding_mask is not None else torch.ones(b, n, dtype=torch.bool, device=device)
    return pad_seq(m, n_pad, dim=1, value=False)


def _dense_mask(allowed, n_q: int, n_k: int, device, key_padding_mask=None):
    """(B or 1, 1, n_q, n_k): the predicate on absolute positions, queries aligned to the end of the keys."""
    q_pos = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    k_pos = torch.arange(n_k, device=device)[None, :]
    mask = allowed(q_pos, k_pos)[None, None]
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :]
    return mask


def _flex(q, k, v, allowed, n: int, cache_key=None, real=None, scale=None, return_lse=False, heads=None):
    """flex_attention over length-n q/k/v (padded here to flex's tile) with mask = allowed(h, q, k) & real key
    (`real`: (B, n), or (B, H, n) where heads see different keys). Without a padding mask the block mask
    depends only on the pattern and the length: it is built once
    (`cache_key`) and reused by every step, so a training step pays nothing for it. At a length that is
    already a multiple of the tile nothing is padded or sliced (a slice would cost a zero-filled gradient
    copy in backward)."""
    b = q.shape[0]
    n_pad = _ceil(n, FLEX_BLOCK)
    if n_pad != n:
        q, k, v = (pad_seq(t, n_pad) for t in (q, k, v))
    if real is None and cache_key is not None:
        mask = _cached_block_mask(cache_key, allowed, n, n_pad, q.device, heads)
    else:
        real = real if real is not None else torch.ones(b, n, dtype=torch.bool, device=q.device)
        real = pad_seq(real, n_pad, dim=real.dim() - 1, value=False)
        if real.dim() == 3:
            def mask_mod(bi, hi, qi, ki):
                return allowed(hi, qi, ki) & real[bi, hi, ki]
        else:
            def mask_mod(bi, hi, qi, ki):
                return allowed(hi, qi, ki) & real[bi, ki]
        mask = make_block_mask(mask_mod, b, heads, n_pad, n_pad, q.device)
    res = flex_attention(q, k, v, mask, scale=scale, return_lse=return_lse)
    if return_lse:
        return _unpad(res[0], n), _unpad(res[1], n).float()
    return _unpad(res, n)


def _unpad(x: torch.Tensor, n: int) -> torch.Tensor:
    return x if x.shape[2] == n else x[:, :, :n]


_BLOCK_MASKS: dict = {}


def _cached_block_mask(cache_key, allowed, n, n_pad, device, heads):
    key = (cache_key, n, n_pad, heads, str(device))
    if key not in _BLOCK_MASKS:
        if len(_BLOCK_MASKS) > 64:
            _BLOCK_MASKS.clear()
        if n == n_pad:  # no tile padding: the predicate alone (flex evaluates it in every partial tile)
            def mask_mod(bi, hi, qi, ki):
                return allowed(hi, qi, ki)
        else:
            def mask_mod(bi, hi, qi, ki):
                return allowed(hi, qi, ki) & (ki < n)
        _BLOCK_MASKS[key] = make_block_mask(mask_mod, None, heads, n_pad, n_pad, device)
    return _BLOCK_MASKS[key]


def _no_head(pred):
    return lambda h, q_pos, k_pos: pred(q_pos, k_pos)


# ------------------------------------------------------------------------------------------------ window

def window_predicate(window: int, causal: bool, dilation: int = 1):
    """causal: the `window` previous tokens, self included (i - window < j <= i), as Mistral.
    bidirectional: window // 2 on each side (|i - j| <= window // 2), as Longformer's attention_window.
    dilation d keeps every d-th of them and stretches the reach d times."""
    def allowed(q_pos, k_pos):
        dist = q_pos - k_pos
        ok = (dist >= 0) & (dist < window * dilation) if causal else dist.abs() <= (window // 2) * dilation
        if dilation > 1:
            ok = ok & (dist % dilation == 0)
        return ok
    return allowed


@lru_cache(maxsize=64)
def _band_layout(nb: int, causal: bool, device_str: str) -> torch.Tensor:
    i = torch.arange(nb)[:, None]
    offsets = torch.tensor([-1, 0]) if causal else torch.tensor([-1, 0, 1])
    blocks = i + offsets
    blocks = blocks.masked_fill((blocks < 0) | (blocks >= nb), -1)
    return blocks[None].to(device_str)


def _window_blocked(q, k, v, window, causal, real, scale, dropout_p):
    """Undilated window over a padded sequence: blocks of at least the reach, each query block sees its
    own block and its neighbours (the previous one only, when causal)."""
    n = q.shape[2]
    reach = window - 1 if causal else window // 2
    bs = min(max(reach, 32), n)
    n_pad = _ceil(n, bs)
    q, k, v = (pad_seq(t, n_pad) for t in (q, k, v))
    real = pad_seq(real, n_pad, dim=1, value=False)
    layout = _band_layout(n_pad // bs, causal, str(q.device))
    out, lse = blocked_attention(q, k, v, layout, bs, window_predicate(window, causal), real, scale=scale,
                                 dropout_p=dropout_p)
    return out[:, :, :n], lse[:, :, :n]


def _undilate(x: torch.Tensor, d: int, dim: int = 2) -> torch.Tensor:
    """(B, H, N, …) -> (B * d, H, N / d, …): residue classes mod d become separate sequences, turning a
    dilated window into a plain one."""
    if x.dim() == 2:  # a (B, N) mask
        b, n = x.shape
        return x.view(b, n // d, d).transpose(1, 2).reshape(b * d, n // d)
    b, h, n, e = x.shape
    return x.view(b, h, n // d, d, e).permute(0, 3, 1, 2, 4).reshape(b * d, h, n // d, e)


def _redilate(x: torch.Tensor, d: int) -> torch.Tensor:
    bd, h, m = x.shape[:3]
    rest = x.shape[3:]
    b = bd // d
    x = x.view(b, d, h, m, *rest).transpose(1, 2)  # (B, H, d, M, …)
    x = x.transpose(2, 3)  # (B, H, M, d, …)
    return x.reshape(b, h, m * d, *rest)


def _classes_as_heads(x: torch.Tensor, d: int) -> torch.Tensor:
    """(B, H, N, ...) -> (B, H * d, N / d, ...): residue class r mod d of head h becomes head h * d + r. Unlike
    _undilate's batch folding, a flex mask can tell the classes apart by head, so it stays cacheable."""
    b, h, n = x.shape[:3]
    rest = x.shape[3:]
    return x.view(b, h, n // d, d, *rest).transpose(2, 3).reshape(b, h * d, n // d, *rest)


def _heads_as_classes(x: torch.Tensor, d: int) -> torch.Tensor:
    b, hd, m = x.shape[:3]
    rest = x.shape[3:]
    return x.view(b, hd // d, d, m, *rest).transpose(2, 3).reshape(b, hd // d, m * d, *rest)


def sliding_window_attention(q, k, v, window: int, causal: bool, dilation: int = 1, key_padding_mask=None,
                             scale=None, dropout_p: float = 0.0, impl: str = "auto", return_lse: bool = False):
    b, _, n, _ = q.shape
    allowed = window_predicate(window, causal, dilation)
    impl = choose_impl(impl, q, dropout_p)
    if impl == "reference":
        return dense_masked_attention(q, k, v, _dense_mask(allowed, n, k.shape[2], q.device, key_padding_mask),
                                      scale, return_lse)
    if impl == "flex":
        return _flex(q, k, v, _no_head(allowed), n, ("window", window, causal, dilation), key_padding_mask, scale,
                     return_lse)
    real = _real_keys(key_padding_mask, b, n, n, q.device)
    if dilation > 1:
        n_pad = _ceil(n, dilation)
        qd, kd, vd = (_undilate(pad_seq(t, n_pad), dilation) for t in (q, k, v))
        rd = _undilate(pad_seq(real, n_pad, dim=1, value=False), dilation)
        out, lse = _window_blocked(qd, kd, vd, window, causal, rd, scale, dropout_p)
        out, lse = _redilate(out, dilation)[:, :, :n], _redilate(lse, dilation)[:, :, :n]
    else:
        out, lse = _window_blocked(q, k, v, window, causal, real, scale, dropout_p)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------------ Longformer

def global_positions(global_mask: torch.Tensor):
    """(idx (B, G), valid (B, G)): each example's global tokens in first-come order, G the most any example has
    (an example with fewer fills its slots with other positions, valid False); None when there are none.
    One host sync, for G: it sizes the tensors (the only sync of the Longformer path)."""
    gm = global_mask.bool()
    g = int(gm.sum(1).max())
    if g == 0:
        return None
    order = torch.sort((~gm).to(torch.int8), dim=1, stable=True).indices[:, :g]
    return order, gm.gather(1, order)


def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, H, N, D), idx (B, G) -> (B, H, G, D)."""
    return x.gather(2, idx[:, None, :, None].expand(x.shape[0], x.shape[1], idx.shape[1], x.shape[3]))


def _project_globals(global_qkv, idx):
    """(q_g at positions idx (B, H, G, D), k_g, v_g (B, H, N, D)) from either form of `global_qkv`."""
    if callable(global_qkv):
        return global_qkv(idx)
    qg, kg, vg = global_qkv
    return gather_rows(qg, idx), kg, vg


def longformer_attention(q, k, v, window: int, global_mask=None, global_qkv=None, key_padding_mask=None,
                         scale=None, dropout_p: float = 0.0, impl: str = "auto"):
    """Beltagy et al. 2020. Every token sees the window around it plus every global token; a global token
    sees every token, through its own projections. A global key inside a token's window counts once.
    global_qkv: (q_g, k_g, v_g), each (B, H, N, D); or a function of the global positions idx (B, G) returning
    (q_g at those positions (B, H, G, D), k_g, v_g), so that a caller projects only the G global queries."""
    b, h, n, d = q.shape
    found = None if global_mask is None else global_positions(global_mask)
    if found is None:
        return sliding_window_attention(q, k, v, window, False, 1, key_padding_mask, scale, dropout_p, impl)
    if global_qkv is None:
        raise ValueError("longformer attention with global tokens needs the global projections (global_qkv)")
    idx, gvalid = found
    impl = choose_impl(impl, q, dropout_p)
    if impl == "reference":
        gm = global_mask.bool()
        real = _real_keys(key_padding_mask, b, n, n, q.device)
        qkv_g = _project_globals(global_qkv, torch.arange(n, device=q.device).expand(b, n))  # every row
        band = window_predicate(window, False)
        local = (band(torch.arange(n, device=q.device)[:, None], torch.arange(n, device=q.device)[None])[None]
                 | gm[:, None, :]) & real[:, None, :]
        out = dense_masked_attention(q, k, v, local[:, None])
        out_g = dense_masked_attention(*qkv_g, real[:, None, None, :].expand(b, 1, n, n))
        return torch.where(gm[:, None, :, None], out_g, out)

    if impl == "flex":
        out = _longformer_flex(q, k, v, window, idx, gvalid, key_padding_mask, scale)
    else:
        out = _longformer_blocked(q, k, v, window, idx, gvalid, key_padding_mask, scale, dropout_p)
    # global rows: G queries against all N keys, linear in N (no attention dropout on these few rows)
    qg, kg, vg = _project_globals(global_qkv, idx)
    if impl == "flex":  # one fused SDPA call; an example with no real key lets its unused rows see all (no NaN)
        m = None if key_padding_mask is None else (key_padding_mask | ~key_padding_mask.any(1, keepdim=True))
        out_g = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=None if m is None else m[:, None, None, :],
                                               scale=scale).to(out.dtype)
    else:
        real = _real_keys(key_padding_mask, b, n, n, q.device)
        out_g = dense_masked_attention(qg, kg, vg, real[:, None, None, :].expand(b, 1, idx.shape[1], n), scale)
    keep = gvalid[:, None, :, None]
    return out.scatter(2, idx[:, None, :, None].expand(b, h, idx.shape[1], d), torch.where(keep, out_g, gather_rows(out, idx)))


def _longformer_blocked(q, k, v, window, idx, gvalid, key_padding_mask, scale, dropout_p):
    """Local rows on any device: the band (global keys left out of it) with the global keys as extra keys."""
    b, _, n, _ = q.shape
    real = _real_keys(key_padding_mask, b, n, n, q.device)
    k, v = expand_kv(q, k, v)
    ke, ve = gather_rows(k, idx), gather_rows(v, idx)
    mask_e = (gvalid & real.gather(1, idx))[:, None, None, :].expand(b, 1, n, idx.shape[1])
    is_global = torch.zeros_like(real).scatter(1, idx, gvalid)
    band_real = real & ~is_global  # the band leaves global keys to the global part
    bs = min(max(window // 2, 32), n)
    n_pad = _ceil(n, bs)
    qp, kp, vp = (pad_seq(t, n_pad) for t in (q, k, v))
    mask_e = pad_seq(mask_e, n_pad, dim=2, value=False)
    layout = _band_layout(n_pad // bs, False, str(q.device))
    out, _ = blocked_attention(qp, kp, vp, layout, bs, window_predicate(window, False),
                               pad_seq(band_real, n_pad, dim=1, value=False), extra=(ke, ve, mask_e),
                               scale=scale, dropout_p=dropout_p)
    return out[:, :, :n]


def _longformer_flex(q, k, v, window, idx, gvalid, key_padding_mask, scale):
    """Local rows as ONE flex_attention call. The keys are the sequence followed by its global tokens gathered
    into slots: a query sees its band in the sequence part and, in the slots, the global keys outside its band
    (those inside count once, in the band). The pattern as a mask on the sequence alone would make a whole
    128-wide tile live in every row for each global token (most of the time at 16 globals); gathered, all
    global keys share one tile column. The tile layout depends only on (N, window, slots), so it is built once
    and cached; the per-example positions are tensors the mask_mod reads."""
    b, _, n, _ = q.shape
    g = idx.shape[1]
    n_pad, s_pad = _ceil(n, FLEX_BLOCK), _ceil(g, FLEX_BLOCK)
    reach = window // 2

    def seq_then_slots(t):
        parts = [t] + ([t.new_zeros(*t.shape[:2], n_pad - n, t.shape[3])] if n_pad > n else [])
        parts.append(gather_rows(t, idx))
        if s_pad > g:
            parts.append(t.new_zeros(*t.shape[:2], s_pad - g, t.shape[3]))
        return torch.cat(parts, dim=2)
    kx, vx = seq_then_slots(k), seq_then_slots(v)
    gpos = pad_seq(idx, s_pad, dim=1, value=0)
    gok = gvalid if key_padding_mask is None else gvalid & key_padding_mask.gather(1, idx)
    gok = pad_seq(gok, s_pad, dim=1, value=False)
    real = None if key_padding_mask is None else pad_seq(key_padding_mask.bool(), n_pad, dim=1, value=False)

    # the sequence part's own test is kept minimal: flex runs it in every partial tile
    if real is not None:
        def seq_ok(bi, ki, near):
            return near & real[bi, ki.clamp(max=n_pad - 1)]
    elif n < n_pad:
        def seq_ok(bi, ki, near):
            return near & (ki < n)
    else:
        def seq_ok(bi, ki, near):
            return near

    def mask_mod(bi, hi, qi, ki):
        in_seq = ki < n_pad
        slot = (ki - n_pad).clamp(min=0)
        near = (qi - torch.where(in_seq, ki, gpos[bi, slot])).abs() <= reach
        return torch.where(in_seq, seq_ok(bi, ki, near), gok[bi, slot] & ~near)

    mask = copy.copy(_window_tiles(n, n_pad, -reach, reach, s_pad // FLEX_BLOCK, real is None, str(q.device)))
    mask.mask_mod = mask_mod  # a copy: the cached layout stays shared, the per-call tensors are this call's
    return _unpad(flex_attention(pad_seq(q, n_pad), kx, vx, mask, scale=scale), n)


@lru_cache(maxsize=32)
def _window_tiles(n: int, n_pad: int, lo: int, hi: int, extra: int, exact: bool, device_str: str):
    """flex BlockMask layout of `lo <= q - k <= hi` over n real keys (padded to n_pad), followed by `extra`
    tile columns that every query row scans. Built from the tile arithmetic, never from an (N, N) grid.
    exact=False: no tile is full, so that the mask_mod runs everywhere (it reads per-example data, e.g. a
    padding mask, that a full tile would skip); the extra columns are never full."""
    from torch.nn.attention.flex_attention import BlockMask
    t = FLEX_BLOCK
    nb = n_pad // t
    i, j = torch.arange(nb)[:, None], torch.arange(nb)[None, :]
    d_min, d_max = (i - j) * t - (t - 1), (i - j) * t + (t - 1)  # the range of q - k over tile (i, j)
    live = (d_min <= hi) & (d_max >= lo) & (j * t < n)
    full = (d_min >= lo) & (d_max <= hi) & ((j + 1) * t <= n) & exact
    cols = torch.ones(nb, extra, dtype=torch.bool)
    partial, full = torch.cat([live & ~full, cols], 1), torch.cat([full, ~cols], 1)

    def ordered(m):  # (count, indices) per row, the listed tiles first, as flex reads them
        order = torch.sort((~m).to(torch.int8), dim=1, stable=True).indices
        return m.sum(1).to(torch.int32)[None, None].to(device_str), order.to(torch.int32)[None, None].to(device_str)
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=t,
                                    seq_lengths=(n_pad, n_pad + extra * t))


# ------------------------------------------------------------------------------------------------ BigBird

def bigbird_block_table(nb: int, n_heads: int, num_random: int, num_global: int, generator: torch.Generator,
                        random_blocks: torch.Tensor | None = None) -> torch.Tensor:
    """(H, nb, nb) bool: which key blocks each query block sees, in Zaheer et al.'s ITC layout. The first
    and last `num_global` blocks are global (rows and columns all True); every other block sees its
    neighbours, the global blocks and `num_random` random blocks drawn per head from the rest.
    `random_blocks` (H, nb, r) fixes the random choice (an imported model's layout); -1 = none."""
    i = torch.arange(nb)
    table = (i[:, None] - i[None, :]).abs() <= 1
    glob = (i < num_global) | (i >= nb - num_global)
    table = table | glob[None, :] | glob[:, None]
    table = table[None].repeat(n_heads, 1, 1)
    if random_blocks is None and num_random > 0:
        random_blocks = torch.full((n_heads, nb, num_random), -1, dtype=torch.long)
        for hh in range(n_heads):
            for row in range(nb):
                if glob[row]:
                    continue
                free = (~table[hh, row]).nonzero().flatten()
                pick = free[torch.randperm(len(free), generator=generator)[:num_random]]
                random_blocks[hh, row, : len(pick)] = pick
    if random_blocks is not None:
        rb = random_blocks.to(torch.long)
        hh, row, _ = torch.nonzero(rb >= 0, as_tuple=True)
        table[hh, row, rb[rb >= 0]] = True
    return table


def _table_layout(table: torch.Tensor) -> torch.Tensor:
    """(H, nb, nb) bool -> (H, nb, K) key-block indices, -1 padded (K = the most blocks any row sees)."""
    k = int(table.sum(-1).max())
    order = torch.sort((~table).to(torch.int8), dim=-1, stable=True).indices[..., :k]
    return order.masked_fill(~table.gather(-1, order), -1)


def bigbird_attention(q, k, v, block_size: int, table: torch.Tensor, num_global: int, key_padding_mask=None,
                      scale=None, dropout_p: float = 0.0, impl: str = "auto", cache_key=None):
    """Block-sparse attention over `table` (see bigbird_block_table) for q/k/v padded to nb * block_size.
    Global query blocks see every key; their rows are computed densely (G * block_size rows, linear in N)."""
    b, h, n, d = q.shape
    bs = block_size
    nb = table.shape[-1]
    n_pad = nb * bs
    if n_pad < n or n_pad - n >= bs:
        raise ValueError(f"block table for {nb} blocks of {bs} does not fit a sequence of {n}")
    impl = choose_impl(impl, q, dropout_p)
    table = table.to(q.device)
    if n_pad != n:
        q, k, v = (pad_seq(t, n_pad) for t in (q, k, v))
    if impl == "flex":
        n_flex = _ceil(n_pad, FLEX_BLOCK)
        if n_flex == n_pad:
            def in_table(hi, qi, ki):
                return table[hi, qi // bs, ki // bs]
        else:
            def in_table(hi, qi, ki):  # flex pads past the last block: clamp, _flex masks those keys
                return table[hi, (qi // bs).clamp(max=nb - 1), (ki // bs).clamp(max=nb - 1)]
        if n < n_pad:  # the block padding is never a key (the predicate stays minimal when there is none)
            def allowed(hi, qi, ki):
                return in_table(hi, qi, ki) & (ki < n)
        else:
            allowed = in_table
        real = None if key_padding_mask is None else _real_keys(key_padding_mask, b, n, n_pad, q.device)
        key = None if cache_key is None else (*cache_key, n)
        return _unpad(_flex(q, k, v, allowed, n_pad, key, real, scale, heads=table.shape[0]), n)
    real = _real_keys(key_padding_mask, b, n, n_pad, q.device)
    if impl == "reference":
        dense = table.repeat_interleave(bs, 1).repeat_interleave(bs, 2)[None] & real[:, None, None, :]
        return dense_masked_attention(q, k, v, dense, scale)[:, :, :n]
    # global query blocks are recomputed densely below: in the layout they keep only their own block, so that
    # the gathered width is that of the sparse rows (window + global + random), not the whole sequence
    sparse = table.clone()
    if num_global > 0:
        rows = torch.cat([torch.arange(min(num_global, nb)), torch.arange(max(nb - num_global, 0), nb)])
        sparse[:, rows] = torch.eye(nb, dtype=torch.bool, device=table.device)[rows]
    out, _ = blocked_attention(q, k, v, _table_layout(sparse), bs, None, real, scale=scale, dropout_p=dropout_p)
    if num_global > 0:
        span = min(num_global * bs, n_pad)
        rows = torch.cat([torch.arange(0, span), torch.arange(n_pad - span, n_pad)])
        rows = torch.unique(rows).to(q.device)
        kf, vf = expand_kv(q, k, v)
        mask = real[:, None, None, :].expand(b, 1, len(rows), n_pad)
        out = out.index_copy(2, rows, dense_masked_attention(q[:, :, rows], kf, vf, mask, scale))
    return out[:, :, :n]


# ------------------------------------------------------------------------------------------------ Sparse Transformer

def strided_predicate(stride: int, pattern: str, summary: int = 1, causal: bool = True):
    """Child et al. 2019. strided: the previous `stride` tokens and every stride-th token before them.
    fixed: the tokens of the own block of `stride`, and the last `summary` tokens of every earlier block.
    causal=False mirrors them for an encoder: the `stride` - 1 nearest on each side and every stride-th token
    either way; the whole own block and the summary tokens of every other block."""
    def allowed(q_pos, k_pos):
        dist = q_pos - k_pos
        if pattern == "strided":
            near = (dist >= 0) & (dist < stride) if causal else dist.abs() < stride
            ok = near | (dist % stride == 0)
        else:
            ok = ((q_pos // stride) == (k_pos // stride)) | (k_pos % stride >= stride - summary)
        return ok & (dist >= 0) if causal else ok
    return allowed


@lru_cache(maxsize=64)
def _class_blocks(nb: int, causal: bool, device_str: str) -> torch.Tensor:
    """Every key block for each query block: up to its own (causal) or all of them."""
    i = torch.arange(nb)
    blocks = i[None, :].expand(nb, nb).clone()
    if causal:
        blocks = blocks.masked_fill(blocks > i[:, None], -1)
    return blocks[None].to(device_str)


def sparse_strided_attention(q, k, v, stride: int, pattern: str = "strided", summary: int = 1,
                             key_padding_mask=None, scale=None, dropout_p: float = 0.0, impl: str = "auto",
                             causal: bool = True):
    b, h, n, d = q.shape
    allowed = strided_predicate(stride, pattern, summary, causal)
    impl = choose_impl(impl, q, dropout_p)
    if impl == "reference":
        return dense_masked_attention(q, k, v, _dense_mask(allowed, n, k.shape[2], q.device, key_padding_mask), scale)
    # the local band: the previous `stride` tokens, or the `stride` - 1 nearest on each side
    band = stride if causal else 2 * stride - 1
    # the strided part is attention inside each residue class mod stride, to the strictly earlier tokens of
    # the class (causal) or to all of them but the token itself (whose key the band already holds)
    in_class = (lambda qp, kp: kp < qp) if causal else (lambda qp, kp: kp != qp)
    if impl == "flex" and pattern == "fixed":
        return _flex(q, k, v, _no_head(allowed), n, ("strided", stride, pattern, summary, causal), key_padding_mask,
                     scale)
    if impl == "flex":
        # one mask would touch every tile (each holds a strided column); instead the local band and the
        # strided columns run as two sparse passes, merged through the log-sum-exp. Both masks exclude the
        # keys past n that the padding to a multiple of the stride adds (mirrored queries would reach them),
        # so without a padding mask they depend on the length only and are built once.
        n_pad = _ceil(n, stride)
        real = None if key_padding_mask is None else _real_keys(key_padding_mask, b, n, n_pad, q.device)
        k, v = expand_kv(q, k, v)
        q, k, v = (pad_seq(t, n_pad) for t in (q, k, v))
        near = window_predicate(band, causal)
        o1, l1 = _flex(q, k, v, lambda hi, qi, ki: near(qi, ki) & (ki < n), n_pad, ("window", band, causal, n),
                       real, scale, True)
        # class r of head h is head h * stride + r: its keys sit at positions ki * stride + r
        qd, kd, vd = (_classes_as_heads(t, stride) for t in (q, k, v))
        rd = None if real is None else _classes_as_heads(real[:, None, :, None], stride)[..., 0].repeat(1, h, 1)
        o2, l2 = _flex(qd, kd, vd, lambda hi, qi, ki: in_class(qi, ki) & (ki * stride + hi % stride < n),
                       n_pad // stride, ("in_class", causal, stride, n), rd, scale, True, heads=h * stride)
        out, _ = merge_partials(o1, l1, _heads_as_classes(o2, stride), _heads_as_classes(l2, stride))
        return out[:, :, :n]
    n_pad = _ceil(n, stride)
    real = _real_keys(key_padding_mask, b, n, n_pad, q.device)
    k, v = expand_kv(q, k, v)
    q, k, v = (pad_seq(t, n_pad) for t in (q, k, v))
    nb = n_pad // stride
    if pattern == "fixed":
        # own block (causal inside it, or whole) + the summary columns of the other blocks (earlier ones, when
        # causal) as shared extra keys
        cols = (torch.arange(n_pad, device=q.device) % stride >= stride - summary).nonzero().flatten()
        ke, ve = k[:, :, cols], v[:, :, cols]
        k_block, q_block = cols[None, :] // stride, torch.arange(n_pad, device=q.device)[:, None] // stride
        other = k_block < q_block if causal else k_block != q_block
        mask_e = other[None, None] & real[:, cols][:, None, None, :]
        layout = torch.arange(nb, device=q.device).view(1, nb, 1)
        out, _ = blocked_attention(q, k, v, layout, stride, (lambda qp, kp: kp <= qp) if causal else None, real,
                                   extra=(ke, ve, mask_e), scale=scale, dropout_p=dropout_p)
        return out[:, :, :n]
    o1, l1 = _window_blocked(q, k, v, band, causal, real, scale, dropout_p)
    qd, kd, vd = (_undilate(t, stride) for t in (q, k, v))
    rd = _undilate(real, stride)
    m = qd.shape[2]
    bs = min(max(int(math.sqrt(m)), 16), m)
    m_pad = _ceil(m, bs)
    qd, kd, vd = (pad_seq(t, m_pad) for t in (qd, kd, vd))
    rd = pad_seq(rd, m_pad, dim=1, value=False)
    o2, l2 = blocked_attention(qd, kd, vd, _class_blocks(m_pad // bs, causal, str(q.device)), bs, in_class, rd,
                               scale=scale, dropout_p=dropout_p)
    o2, l2 = _redilate(o2[:, :, :m], stride), _redilate(l2[:, :, :m], stride)
    out, _ = merge_partials(o1, l1, o2, l2)
    return out[:, :, :n]
