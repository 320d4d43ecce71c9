"""Triton kernels for causal linear attention and the FAVOR+ feature map (CUDA; the torch scan in
kernels/linear_attention.py is the reference they are tested against).

Causal linear attention, chunked as in flash-linear-attention's "chunk" scheme, with the normaliser:
    out_i = num_i / den_i,  num_i = sum_{j<=i} (q_i . k_j) v_j,  den_i = sum_{j<=i} q_i . k_j
For chunk c with state S_c = sum_{j before c} k_j v_j^T (m x dv) and z_c = sum_{j before c} k_j:
    num = tril(Q K^T) V + Q S_c,   den = rowsum(tril(Q K^T)) + Q z_c.
Forward: (1) the sequence is cut into segments of SEGMENT chunks; one program per (batch*head, m tile, dv
tile, segment) walks its segment's chunks in order and writes S_c, z_c counted from the segment's start, and the
segment's total (the only sequential part: SEGMENT steps of a C x BK x BV matmul); (2) one short walk over the
segments' totals writes each segment's exclusive prefix and the final state; (3) one program per (chunk,
batch*head, dv tile) adds its segment's prefix to S_c, z_c and computes its outputs.
Backward, with g = dout / den and r = -(dout . out) / den:
    dA = tril(G V^T + r 1^T),  dQ = dA K + G S_c^T + r z_c^T,  dK = dA^T Q + V dS_c^T + 1 dz_c^T,
    dV = tril(Q K^T)^T G + K dS_c,
where dS_c = sum_{i after c} q_i g_i^T and dz_c = sum_{i after c} r_i q_i come from the same segmented walk in
reverse (plus the final state's own gradient, when the final state is used).
Matmuls take the inputs' dtype (bf16) and accumulate in fp32; den, z and r stay fp32; the chunk states
are stored in the input dtype (their rounding is that of one bf16 operand). Memory: inputs, outputs and
n / C states of m x dv, linear in n.

FAVOR+ features phi(x) = exp(s w.x - s^2 |x|^2 / 2 - offset) / sqrt(m), s = d^-1/4, are computed by one
kernel from x and the projection (the logits never reach memory); the backward is one kernel too:
dx = s (dl W) - s^2 rowsum(dl) x with dl = dphi * phi. The offsets (a query's own max, the keys' shared max)
are constants to the gradient: the attention output does not depend on them (they cancel in num / den).
The floor at e^-30 is not differentiated (the reference's clamp gives those features zero gradient; here they
get phi * dphi, ~e^-30 of the largest, which changes nothing measurable).

The causal Performer's training step (no running state, no padded keys) is one autograd node,
_CausalFavorAttention: the backward chunk kernel multiplies its dq, dk tiles by the q, k feature tiles it has
loaded anyway (EPI=1), and the features' backward reads that product dl directly (PRODUCT), instead of reading
the feature gradient and the features (2026-11-30 on the H200: 2.44 against 2.58 ms at 16K; the feature
backward 0.20 against 0.37 ms). The segment prefix as one Triton walk, instead of torch's cumsum, subtract and
cast kernels, took the step from 2.42 to 2.34 ms (same process, 7 interleaved rounds).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK = 64  # positions per chunk: the tensor-core tile; the result does not depend on it
# chunks per sequential walk: the state scans run one program per segment, in parallel (32: fewer segments to
# prefix, enough programs at 16K; 2026-11-30 on the H200, against 16: see LAUNCH)
SEGMENT = 32
LOG_FLOOR = -30.0  # as kernels/linear_attention._LOG_FLOOR
# the FAVOR+ kernels' tiles: rows of x per program, features per inner step (module-level: the compare mode of
# scripts/tune_linear_kernels.py times other values)
FAVOR_ROWS, FAVOR_FEATURES = 64, 64
# features per inner step of the chunk kernels (forward outputs, backward): the backward's many accumulators
# fit 4 warps at 32 features (see LAUNCH)
OUT_TILE, BWD_TILE = 64, 32
# launch settings per kernel (num_warps, num_stages), as chosen on the H200 by scripts/tune_linear_kernels.py
# (2026-11-29; the spread between settings was within that run's noise, ~10%); module-level so it can retune.
# bwd_chunk (4, 1) with BWD_TILE 32 and SEGMENT 32: the causal Performer at 16K took 2.18 ms against 2.34 with
# (8, 1), 64 and 16 (2026-11-30, `tune_linear_kernels.py compare=true`, 7 interleaved rounds); 2 stages then took
# the causal Performer from 2.23 to 2.00 ms and linear attention from 1.60 to 1.48 (`tune_linear_kernels.py
# other=<this file with (4, 2)> variants=false rounds=7`, 2026-11-30, the machine otherwise idle)
LAUNCH = {"fwd_states": (4, 1), "fwd_out": (4, 1), "bwd_prep": (4, 1), "bwd_states": (4, 1), "bwd_chunk": (4, 2),
          "favor_fwd": (8, 2), "favor_bwd": (4, 1)}


def _p2(x: int, lo: int = 16) -> int:
    return max(lo, triton.next_power_of_2(x))


def _prec(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 inputs: no silent TF32 rounding


# ------------------------------------------------------------------------------------------ attention, forward

@triton.jit
def _state_tile(NV, M, DV, BK: tl.constexpr, BV: tl.constexpr):
    """A state-walk program's (batch*head, segment, m tile, dv tile) and its (m, dv) tile's offsets and masks."""
    i_bh, i_kv, i_g = tl.program_id(0).to(tl.int64), tl.program_id(1), tl.program_id(2)
    i_k, i_v = i_kv // NV, i_kv % NV
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk, mv = ok < M, ov < DV
    return i_bh, i_g, i_k, i_v, ok, ov, mk, mk[:, None] & mv[None, :]


@triton.jit
def _store_state(s_ptr, z_ptr, base, DV, s, z, ok, ov, mk, m2, i_v):
    """One (m, dv) tile of a state at row `base`, and its normaliser part, written once per m tile."""
    tl.store(s_ptr + base * DV + ok[:, None] * DV + ov[None, :], s.to(s_ptr.dtype.element_ty), mask=m2)
    if i_v == 0:
        tl.store(z_ptr + base + ok, z, mask=mk)


@triton.jit
def _fwd_states(k, v, h, zs, seg_s, seg_z, N, M, DV, NC, NV,
                C: tl.constexpr, CPS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """Within segment g (CPS chunks): the state before each chunk counted from the segment's start, and the
    segment's total. The segments' prefix is added by the consumers (a short sequential walk per program)."""
    i_bh, i_g, i_k, i_v, ok, ov, mk, m2 = _state_tile(NV, M, DV, BK, BV)
    s = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    for i in range(tl.minimum(CPS, NC - i_g * CPS)):
        c = i_g * CPS + i
        base = (i_bh * NC + c) * M
        _store_state(h, zs, base, DV, s, z, ok, ov, mk, m2, i_v)
        p_k = tl.make_block_ptr(k + i_bh * N * M, (N, M), (M, 1), (c * C, i_k * BK), (C, BK), (1, 0))
        p_v = tl.make_block_ptr(v + i_bh * N * DV, (N, DV), (DV, 1), (c * C, i_v * BV), (C, BV), (1, 0))
        b_k = tl.load(p_k, boundary_check=(0, 1))
        b_v = tl.load(p_v, boundary_check=(0, 1))
        s += tl.dot(tl.trans(b_k), b_v, input_precision=PREC)
        z += tl.sum(b_k.to(tl.float32), axis=0)
    _store_state(seg_s, seg_z, (i_bh * tl.num_programs(2) + i_g) * M, DV, s, z, ok, ov, mk, m2, i_v)


@triton.jit
def _fwd_out(q, k, v, h, zs, pre_s, pre_z, o, den, N, M, DV, NC, NG,
             C: tl.constexpr, CPS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    i_c, i_bh, i_v = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2)
    t = tl.arange(0, C)
    causal = t[:, None] >= t[None, :]
    a = tl.zeros([C, C], dtype=tl.float32)
    num = tl.zeros([C, BV], dtype=tl.float32)
    d = tl.zeros([C], dtype=tl.float32)
    for i_k in range(tl.cdiv(M, BK)):
        p_q = tl.make_block_ptr(q + i_bh * N * M, (N, M), (M, 1), (i_c * C, i_k * BK), (C, BK), (1, 0))
        p_k = tl.make_block_ptr(k + i_bh * N * M, (N, M), (M, 1), (i_c * C, i_k * BK), (C, BK), (1, 0))
        p_h = tl.make_block_ptr(h + (i_bh * NC + i_c) * M * DV, (M, DV), (DV, 1), (i_k * BK, i_v * BV), (BK, BV),
                                (1, 0))
        b_q = tl.load(p_q, boundary_check=(0, 1))
        b_k = tl.load(p_k, boundary_check=(0, 1))
        ok = i_k * BK + tl.arange(0, BK)
        ov = i_v * BV + tl.arange(0, BV)
        pb = (i_bh * NG + i_c // CPS) * M
        b_h = tl.load(p_h, boundary_check=(0, 1)).to(tl.float32) + tl.load(
            pre_s + (pb + ok[:, None]) * DV + ov[None, :], mask=(ok < M)[:, None] & (ov < DV)[None, :],
            other=0.0).to(tl.float32)
        b_z = tl.load(zs + (i_bh * NC + i_c) * M + ok, mask=ok < M, other=0.0) + tl.load(
            pre_z + pb + ok, mask=ok < M, other=0.0)
        num += tl.dot(b_q, b_h.to(b_q.dtype), input_precision=PREC)
        d += tl.sum(b_q.to(tl.float32) * b_z[None, :], axis=1)
        a += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
    a = tl.where(causal, a, 0.0)
    p_v = tl.make_block_ptr(v + i_bh * N * DV, (N, DV), (DV, 1), (i_c * C, i_v * BV), (C, BV), (1, 0))
    b_v = tl.load(p_v, boundary_check=(0, 1))
    num += tl.dot(a.to(b_v.dtype), b_v, input_precision=PREC)
    d += tl.sum(a, axis=1)
    # a query that sees no valid key has den 0 (and num 0): zeros, as the reference's clamp gives
    out = num / tl.maximum(d, 1.1754943508222875e-38)[:, None]
    p_o = tl.make_block_ptr(o + i_bh * N * DV, (N, DV), (DV, 1), (i_c * C, i_v * BV), (C, BV), (1, 0))
    tl.store(p_o, out.to(o.dtype.element_ty), boundary_check=(0, 1))
    if i_v == 0:
        pos = i_c * C + t
        tl.store(den + i_bh * N + pos, d, mask=pos < N)


# ------------------------------------------------------------------------------------------ attention, backward

@triton.jit
def _bwd_prep(do, o, den, g, r, N, DV, BN: tl.constexpr, BDV: tl.constexpr):
    """g = dout / den (input dtype), r = -(dout . out) / den (fp32); 0 where den is 0 (no key seen)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = i_n * BN + tl.arange(0, BN)
    cols = tl.arange(0, BDV)
    m2 = (rows < N)[:, None] & (cols < DV)[None, :]
    off = i_bh * N * DV + rows[:, None] * DV + cols[None, :]
    b_do = tl.load(do + off, mask=m2, other=0.0).to(tl.float32)
    b_o = tl.load(o + off, mask=m2, other=0.0).to(tl.float32)
    d = tl.load(den + i_bh * N + rows, mask=rows < N, other=0.0)
    inv = tl.where(d > 0, 1.0 / tl.where(d > 0, d, 1.0), 0.0)
    tl.store(g + off, (b_do * inv[:, None]).to(g.dtype.element_ty), mask=m2)
    tl.store(r + i_bh * N + rows, -tl.sum(b_do * b_o, axis=1) * inv, mask=rows < N)


@triton.jit
def _bwd_states(q, g, r, dh, dzs, seg_ds, seg_dz, N, M, DV, NC, NV,
                C: tl.constexpr, CPS: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr, PREC: tl.constexpr):
    """dS_c, dz_c within segment g, walked from its last chunk back (the gradient reaching the state before
    chunk c from the segment's later positions), and the segment's total; the later segments' part (and the
    final state's own gradient) is added by the consumer."""
    i_bh, i_g, i_k, i_v, ok, ov, mk, m2 = _state_tile(NV, M, DV, BK, BV)
    ds = tl.zeros([BK, BV], dtype=tl.float32)
    dz = tl.zeros([BK], dtype=tl.float32)
    n_local = tl.minimum(CPS, NC - i_g * CPS)
    for i in range(n_local):
        c = i_g * CPS + n_local - 1 - i
        base = (i_bh * NC + c) * M
        _store_state(dh, dzs, base, DV, ds, dz, ok, ov, mk, m2, i_v)
        p_q = tl.make_block_ptr(q + i_bh * N * M, (N, M), (M, 1), (c * C, i_k * BK), (C, BK), (1, 0))
        p_g = tl.make_block_ptr(g + i_bh * N * DV, (N, DV), (DV, 1), (c * C, i_v * BV), (C, BV), (1, 0))
        b_q = tl.load(p_q, boundary_check=(0, 1))
        b_g = tl.load(p_g, boundary_check=(0, 1))
        pos = c * C + tl.arange(0, C)
        b_r = tl.load(r + i_bh * N + pos, mask=pos < N, other=0.0)
        ds += tl.dot(tl.trans(b_q), b_g, input_precision=PREC)
        dz += tl.sum(b_q.to(tl.float32) * b_r[:, None], axis=0)
    _store_state(seg_ds, seg_dz, (i_bh * tl.num_programs(2) + i_g) * M, DV, ds, dz, ok, ov, mk, m2, i_v)


@triton.jit
def _bwd_chunk(q, k, v, g, r, h, zs, pre_s, pre_z, dh, dzs, pre_ds, pre_dz, dq, dk, dv, N, M, DV, NC, NG,
               C: tl.constexpr, CPS: tl.constexpr, BK: tl.constexpr, BDV: tl.constexpr, PREC: tl.constexpr,
               EPI: tl.constexpr):
    """dq, dk, dv of chunk i_c; EPI 1: dq * q and dk * k instead (the features' own input gradient)."""
    i_c, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    t = tl.arange(0, C)
    pos = i_c * C + t
    causal = t[:, None] >= t[None, :]
    p_g = tl.make_block_ptr(g + i_bh * N * DV, (N, DV), (DV, 1), (i_c * C, 0), (C, BDV), (1, 0))
    p_v = tl.make_block_ptr(v + i_bh * N * DV, (N, DV), (DV, 1), (i_c * C, 0), (C, BDV), (1, 0))
    b_g = tl.load(p_g, boundary_check=(0, 1))
    b_v = tl.load(p_v, boundary_check=(0, 1))
    b_r = tl.load(r + i_bh * N + pos, mask=pos < N, other=0.0)
    da = tl.where(causal, tl.dot(b_g, tl.trans(b_v), input_precision=PREC) + b_r[:, None], 0.0).to(b_v.dtype)
    # q and k are read once: the same pass sums A = Q K^T (for dV's intra-chunk part, added after it)
    a = tl.zeros([C, C], dtype=tl.float32)
    b_dv = tl.zeros([C, BDV], dtype=tl.float32)
    for i_k in range(tl.cdiv(M, BK)):
        ok = i_k * BK + tl.arange(0, BK)
        p_q = tl.make_block_ptr(q + i_bh * N * M, (N, M), (M, 1), (i_c * C, i_k * BK), (C, BK), (1, 0))
        p_k = tl.make_block_ptr(k + i_bh * N * M, (N, M), (M, 1), (i_c * C, i_k * BK), (C, BK), (1, 0))
        hb = (i_bh * NC + i_c) * M
        p_h = tl.make_block_ptr(h + hb * DV, (M, DV), (DV, 1), (i_k * BK, 0), (BK, BDV), (1, 0))
        p_dh = tl.make_block_ptr(dh + hb * DV, (M, DV), (DV, 1), (i_k * BK, 0), (BK, BDV), (1, 0))
        b_q = tl.load(p_q, boundary_check=(0, 1))
        b_k = tl.load(p_k, boundary_check=(0, 1))
        # the chunk's states: segment-local part + the other segments' part (fp32, small)
        pb = (i_bh * NG + i_c // CPS) * M
        od = tl.arange(0, BDV)
        pm = (ok < M)[:, None] & (od < DV)[None, :]
        po = (pb + ok[:, None]) * DV + od[None, :]
        b_h = (tl.load(p_h, boundary_check=(0, 1)).to(tl.float32)
               + tl.load(pre_s + po, mask=pm, other=0.0).to(tl.float32)).to(b_q.dtype)
        b_dh = (tl.load(p_dh, boundary_check=(0, 1)).to(tl.float32)
                + tl.load(pre_ds + po, mask=pm, other=0.0).to(tl.float32)).to(b_q.dtype)
        b_z = tl.load(zs + hb + ok, mask=ok < M, other=0.0) + tl.load(pre_z + pb + ok, mask=ok < M, other=0.0)
        b_dz = tl.load(dzs + hb + ok, mask=ok < M, other=0.0) + tl.load(pre_dz + pb + ok, mask=ok < M, other=0.0)
        b_dq = tl.dot(da, b_k, input_precision=PREC) + tl.dot(b_g, tl.trans(b_h), input_precision=PREC)
        b_dq += b_r[:, None] * b_z[None, :]
        b_dk = tl.dot(tl.trans(da), b_q, input_precision=PREC) + tl.dot(b_v, tl.trans(b_dh), input_precision=PREC)
        b_dk += b_dz[None, :]
        b_dv += tl.dot(b_k, b_dh, input_precision=PREC)
        a += tl.dot(b_q, tl.trans(b_k), input_precision=PREC)
        if EPI == 1:
            b_dq *= b_q.to(tl.float32)
            b_dk *= b_k.to(tl.float32)
        p_dq = tl.make_block_ptr(dq + i_bh * N * M, (N, M), (M, 1), (i_c * C, i_k * BK), (C, BK), (1, 0))
        p_dk = tl.make_block_ptr(dk + i_bh * N * M, (N, M), (M, 1), (i_c * C, i_k * BK), (C, BK), (1, 0))
        tl.store(p_dq, b_dq.to(dq.dtype.element_ty), boundary_check=(0, 1))
        tl.store(p_dk, b_dk.to(dk.dtype.element_ty), boundary_check=(0, 1))
    a = tl.where(causal, a, 0.0).to(b_v.dtype)
    b_dv += tl.dot(tl.trans(a), b_g, input_precision=PREC)
    p_dv = tl.make_block_ptr(dv + i_bh * N * DV, (N, DV), (DV, 1), (i_c * C, 0), (C, BDV), (1, 0))
    tl.store(p_dv, b_dv.to(dv.dtype.element_ty), boundary_check=(0, 1))


def _launch(kernel, name, grid, *args, **meta):
    warps, stages = LAUNCH[name]
    kernel[grid](*args, num_warps=warps, num_stages=stages, **meta)


@triton.jit
def _segment_prefix(seg_s, seg_z, init_s, init_z, pre_s, pre_z, fin_s, fin_z, G, M, DV, NV,
                    HAS_INIT: tl.constexpr, REVERSE: tl.constexpr, BK: tl.constexpr, BV: tl.constexpr):
    """For each segment the sum of the earlier segments' totals (the later ones' when REVERSE) plus the initial
    state, in pre_s's dtype (and fp32 for z); and the whole sum, fp32 (the final state, or the initial state's
    gradient when REVERSE). One walk over G segments per (batch*head, m tile, dv tile): each total read once."""
    i_bh, i_kv = tl.program_id(0).to(tl.int64), tl.program_id(1)
    i_k, i_v = i_kv // NV, i_kv % NV
    ok = i_k * BK + tl.arange(0, BK)
    ov = i_v * BV + tl.arange(0, BV)
    mk = ok < M
    m2 = mk[:, None] & (ov < DV)[None, :]
    o2 = ok[:, None] * DV + ov[None, :]
    s = tl.zeros([BK, BV], dtype=tl.float32)
    z = tl.zeros([BK], dtype=tl.float32)
    if HAS_INIT:
        s += tl.load(init_s + i_bh * M * DV + o2, mask=m2, other=0.0)
        z += tl.load(init_z + i_bh * M + ok, mask=mk, other=0.0)
    for i in range(G):
        g = G - 1 - i if REVERSE else i
        base = (i_bh * G + g) * M
        tl.store(pre_s + base * DV + o2, s.to(pre_s.dtype.element_ty), mask=m2)
        s += tl.load(seg_s + base * DV + o2, mask=m2, other=0.0)
        if i_v == 0:
            tl.store(pre_z + base + ok, z, mask=mk)
            z += tl.load(seg_z + base + ok, mask=mk, other=0.0)
    tl.store(fin_s + i_bh * M * DV + o2, s, mask=m2)
    if i_v == 0:
        tl.store(fin_z + i_bh * M + ok, z, mask=mk)


def _prefix(seg_s, seg_z, init_s, init_z, dtype, reverse: bool = False):
    """(bh, G, m, dv) and (bh, G, m) fp32 segment totals -> (pre_s in `dtype`, pre_z fp32, sum_s, sum_z fp32):
    each segment's exclusive prefix (suffix when reverse) plus the initial state (init_s, init_z or None), and
    the whole sum with it."""
    bh, ng, m, dv = seg_s.shape
    bk, bv = min(32, _p2(m)), min(128, _p2(dv))
    nv = triton.cdiv(dv, bv)
    pre_s = torch.empty(bh, ng, m, dv, device=seg_s.device, dtype=dtype)
    pre_z, sum_s, sum_z = torch.empty_like(seg_z), torch.empty_like(seg_s[:, 0]), torch.empty_like(seg_z[:, 0])
    init = init_s is not None
    _segment_prefix[(bh, triton.cdiv(m, bk) * nv)](
        seg_s, seg_z, init_s.contiguous() if init else seg_s, init_z.contiguous() if init else seg_z, pre_s, pre_z,
        sum_s, sum_z, ng, m, dv, nv, HAS_INIT=init, REVERSE=reverse, BK=bk, BV=bv)
    return pre_s, pre_z, sum_s, sum_z


def _attention_forward(q, k, v, s0, z0, chunk, segment):
    """(bh, n, m) features q, k, (bh, n, dv) values, fp32 initial state or None -> (out, final S, final z, the
    tensors the backward reads)."""
    bh, n, m = q.shape
    dv = v.shape[-1]
    nc = triton.cdiv(n, chunk)
    ng = triton.cdiv(nc, segment)
    bk, bv = min(64, _p2(m)), min(128, _p2(dv))  # a whole value row per program: k and q are read once
    nk, nv = triton.cdiv(m, bk), triton.cdiv(dv, bv)
    f32 = dict(device=q.device, dtype=torch.float32)
    h = torch.empty(bh, nc, m, dv, device=q.device, dtype=q.dtype)
    zs = torch.empty(bh, nc, m, **f32)
    seg_s, seg_z = torch.empty(bh, ng, m, dv, **f32), torch.empty(bh, ng, m, **f32)
    prec = _prec(q.dtype)
    _launch(_fwd_states, "fwd_states", (bh, nk * nv, ng), k, v, h, zs, seg_s, seg_z, n, m, dv, nc, nv,
            C=chunk, CPS=segment, BK=bk, BV=bv, PREC=prec)
    # pre_s rounded as the chunk states are: it is read by every chunk of its segment
    pre_s, pre_z, s_final, z_final = _prefix(seg_s, seg_z, s0, z0, q.dtype)
    o = torch.empty_like(v)
    den = torch.empty(bh, n, **f32)
    bvo = min(128, _p2(dv))
    _launch(_fwd_out, "fwd_out", (nc, bh, triton.cdiv(dv, bvo)), q, k, v, h, zs, pre_s, pre_z, o, den, n, m, dv,
            nc, ng, C=chunk, CPS=segment, BK=min(OUT_TILE, _p2(m)), BV=bvo, PREC=prec)
    return o, s_final, z_final, (q, k, v, o, den, h, zs, pre_s, pre_z)


def _attention_backward(saved, do, ds_final, dz_final, chunk, segment, use_h0, epi=0):
    """Gradients (dq, dk, dv, dS0, dz0) from _attention_forward's tensors; epi=1 returns dq * q and dk * k
    instead of dq and dk (what the FAVOR+ features' backward reads: one tensor, not two)."""
    q, k, v, o, den, h, zs, pre_s, pre_z = saved
    bh, n, m = q.shape
    dv = v.shape[-1]
    nc = triton.cdiv(n, chunk)
    ng = triton.cdiv(nc, segment)
    f32 = dict(device=q.device, dtype=torch.float32)
    g = torch.empty_like(v)
    r = torch.empty(bh, n, **f32)
    if do is None:
        g.zero_()
        r.zero_()
    else:
        _launch(_bwd_prep, "bwd_prep", (triton.cdiv(n, 64), bh), do.contiguous(), o, den, g, r, n, dv,
                BN=64, BDV=_p2(dv))
    bk, bv = min(64, _p2(m)), min(128, _p2(dv))
    nk, nv = triton.cdiv(m, bk), triton.cdiv(dv, bv)
    dh = torch.empty_like(h)
    dzs = torch.empty_like(zs)
    seg_ds, seg_dz = torch.empty(bh, ng, m, dv, **f32), torch.empty(bh, ng, m, **f32)
    prec = _prec(q.dtype)
    _launch(_bwd_states, "bwd_states", (bh, nk * nv, ng), q, g, r, dh, dzs, seg_ds, seg_dz, n, m, dv, nc, nv,
            C=chunk, CPS=segment, BK=bk, BV=bv, PREC=prec)
    # the later segments' part, walked backwards from the final state's own gradient; the whole walk is the
    # initial state's gradient (it reaches every position)
    if ds_final is not None or dz_final is not None:
        ds_final = torch.zeros_like(seg_ds[:, 0]) if ds_final is None else ds_final.float()
        dz_final = torch.zeros_like(seg_dz[:, 0]) if dz_final is None else dz_final.float()
    pre_ds, pre_dz, ds0, dz0 = _prefix(seg_ds, seg_dz, ds_final, dz_final, q.dtype, reverse=True)
    dq, dk, dvv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _launch(_bwd_chunk, "bwd_chunk", (nc, bh), q, k, v, g, r, h, zs, pre_s, pre_z, dh, dzs, pre_ds, pre_dz,
            dq, dk, dvv, n, m, dv, nc, ng, C=chunk, CPS=segment, BK=min(BWD_TILE, _p2(m)), BDV=_p2(dv), PREC=prec,
            EPI=epi)
    if not use_h0:
        ds0 = dz0 = None
    return dq, dk, dvv, ds0, dz0


class _CausalLinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, s0, z0, chunk, segment):
        o, s_final, z_final, saved = _attention_forward(q, k, v, s0, z0, chunk, segment)
        ctx.save_for_backward(*saved)
        ctx.chunk, ctx.segment, ctx.use_h0 = chunk, segment, s0 is not None
        ctx.set_materialize_grads(False)
        return o, s_final, z_final

    @staticmethod
    def backward(ctx, do, ds_final, dz_final):
        grads = _attention_backward(ctx.saved_tensors, do, ds_final, dz_final, ctx.chunk, ctx.segment, ctx.use_h0)
        return (*grads, None, None)


def causal_linear_attention(phi_q, phi_k, v, state=None, chunk: int | None = None, segment: int | None = None):
    """Causal linear attention from features, as kernels.linear_attention.linear_attention(causal=True):
    phi_q, phi_k (b, h, n, m) with padded keys zero, v (b, h, n, dv), state (S (b, h, m, dv), z (b, h, m)) or
    None. Computes in v's dtype (bf16/fp16 -> bf16 matmuls with fp32 accumulation; fp32 -> fp32 matmuls).
    Returns (out (b, h, n, dv) in v's dtype, (S, z) fp32 final state); differentiable in all of them."""
    b, hh, n, m = phi_q.shape
    dv = v.shape[-1]
    dt = torch.bfloat16 if v.dtype in (torch.bfloat16, torch.float16) else torch.float32
    q, k, vv = (t.to(dt).reshape(b * hh, n, t.shape[-1]).contiguous() for t in (phi_q, phi_k, v))
    s0 = z0 = None
    if state is not None:
        s0 = state[0].float().reshape(b * hh, m, dv).contiguous()
        z0 = state[1].float().reshape(b * hh, m).contiguous()
    o, s, z = _CausalLinearAttention.apply(q, k, vv, s0, z0, chunk or CHUNK, segment or SEGMENT)
    return o.reshape(b, hh, n, dv).to(v.dtype), (s.reshape(b, hh, m, dv), z.reshape(b, hh, m))


# ------------------------------------------------------------------------------------------ FAVOR+ features

@triton.jit
def _favor_logits(b_x, sq, w, i_m, D, M, scale_x, BD: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr):
    """Logits of a row tile against features [i_m * BM, (i_m + 1) * BM); features past M are -inf."""
    cd, cm = tl.arange(0, BD), i_m * BM + tl.arange(0, BM)
    b_w = tl.load(w + cm[:, None] * D + cd[None, :], mask=(cm < M)[:, None] & (cd < D)[None, :], other=0.0)
    # x itself goes into the matmul (exact in its dtype), the scale s = d^-1/4 comes after, in fp32
    logit = tl.dot(b_x, tl.trans(b_w), input_precision=PREC) * scale_x - sq[:, None]
    return tl.where((cm < M)[None, :], logit, float("-inf"))


@triton.jit
def _favor_fwd(x, w, off, phi, rowmax, N, D, M, scale_x, scale_phi,
               BN: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr,
               FLOOR: tl.constexpr, ONE_TILE: tl.constexpr):
    """MODE 0: query features, each row minus its own max. MODE 1: only the keys' row max (for the shared
    offset). MODE 2: key features minus the per-(batch, head) offset `off`. Features in tiles of BM: unless one
    tile holds them all (ONE_TILE), a row's max takes one pass over them, the features another (the matmul is
    recomputed: cheaper than storing)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = i_n * BN + tl.arange(0, BN)
    cd = tl.arange(0, BD)
    mr = rows < N
    b_x = tl.load(x + i_bh * N * D + rows[:, None] * D + cd[None, :], mask=mr[:, None] & (cd < D)[None, :],
                  other=0.0)
    xf = b_x.to(tl.float32)
    sq = (0.5 * scale_x * scale_x) * tl.sum(xf * xf, axis=1)
    if MODE == 2:
        shift = tl.zeros([BN], dtype=tl.float32) + tl.load(off + i_bh)
    elif not ONE_TILE:
        shift = tl.full([BN], float("-inf"), dtype=tl.float32)
        for i_m in range(tl.cdiv(M, BM)):
            logit = _favor_logits(b_x, sq, w, i_m, D, M, scale_x, BD, BM, PREC)
            shift = tl.maximum(shift, tl.max(logit, axis=1))
    if ONE_TILE:  # all features in one tile: the logits once, for the max and the features
        logit = _favor_logits(b_x, sq, w, 0, D, M, scale_x, BD, BM, PREC)
        if MODE != 2:
            shift = tl.max(logit, axis=1)
        if MODE == 1:
            tl.store(rowmax + i_bh * N + rows, shift, mask=mr)
        else:
            _favor_store(phi, logit, shift, i_bh, rows, 0, N, M, scale_phi, BM, FLOOR)
    elif MODE == 1:
        tl.store(rowmax + i_bh * N + rows, shift, mask=mr)
    else:
        for i_m in range(tl.cdiv(M, BM)):
            logit = _favor_logits(b_x, sq, w, i_m, D, M, scale_x, BD, BM, PREC)
            _favor_store(phi, logit, shift, i_bh, rows, i_m, N, M, scale_phi, BM, FLOOR)


@triton.jit
def _favor_store(phi, logit, shift, i_bh, rows, i_m, N, M, scale_phi, BM: tl.constexpr, FLOOR: tl.constexpr):
    """Features [i_m * BM, (i_m + 1) * BM) of a row tile from their logits and the rows' shifts."""
    f = tl.exp(tl.maximum(logit - shift[:, None], FLOOR)) * scale_phi
    cm = i_m * BM + tl.arange(0, BM)
    tl.store(phi + i_bh * N * M + rows[:, None] * M + cm[None, :], f.to(phi.dtype.element_ty),
             mask=(rows < N)[:, None] & (cm < M)[None, :])


@triton.jit
def _favor_bwd(x, w, phi, dphi, dx, N, D, M, scale_x,
               BN: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr, PREC: tl.constexpr, PRODUCT: tl.constexpr):
    """dx from dl = dphi * phi; PRODUCT: `dphi` holds dl already (phi is not read)."""
    i_n, i_bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rows = i_n * BN + tl.arange(0, BN)
    cd = tl.arange(0, BD)
    mr, md = rows < N, cd < D
    acc = tl.zeros([BN, BD], dtype=tl.float32)
    rs = tl.zeros([BN], dtype=tl.float32)
    for i_m in range(tl.cdiv(M, BM)):
        cm = i_m * BM + tl.arange(0, BM)
        mf = mr[:, None] & (cm < M)[None, :]
        off_f = i_bh * N * M + rows[:, None] * M + cm[None, :]
        dl = tl.load(dphi + off_f, mask=mf, other=0.0).to(tl.float32)
        if not PRODUCT:
            dl *= tl.load(phi + off_f, mask=mf, other=0.0).to(tl.float32)
        b_w = tl.load(w + cm[:, None] * D + cd[None, :], mask=(cm < M)[:, None] & md[None, :], other=0.0)
        rs += tl.sum(dl, axis=1)
        acc += tl.dot(dl.to(b_w.dtype), b_w, input_precision=PREC)
    mx = mr[:, None] & md[None, :]
    off_x = i_bh * N * D + rows[:, None] * D + cd[None, :]
    xf = tl.load(x + off_x, mask=mx, other=0.0).to(tl.float32)
    g = acc * scale_x - (scale_x * scale_x) * rs[:, None] * xf
    tl.store(dx + off_x, g.to(dx.dtype.element_ty), mask=mx)


def _favor_meta(x, w):
    n, d, m = x.shape[1], x.shape[2], w.shape[0]
    return n, d, m, dict(BN=FAVOR_ROWS, BD=_p2(d), BM=min(FAVOR_FEATURES, _p2(m)), PREC=_prec(x.dtype))


def _favor_phi(x, w, offset):
    """(bh, n, d) -> (bh, n, m) features: offset None -> each row minus its own max; else minus offset (bh,)."""
    n, d, m, meta = _favor_meta(x, w)
    phi = torch.empty(x.shape[0], n, m, device=x.device, dtype=x.dtype)
    _launch(_favor_fwd, "favor_fwd", (triton.cdiv(n, meta["BN"]), x.shape[0]), x, w,
            offset if offset is not None else phi, phi, phi, n, d, m, d ** -0.25, m ** -0.5,
            MODE=0 if offset is None else 2, FLOOR=LOG_FLOOR, ONE_TILE=m <= meta["BM"], **meta)
    return phi


def _favor_dx(x, w, phi, dphi, product: bool = False):
    """The input gradient of _favor_phi; product: dphi holds dphi * phi already (phi may be None)."""
    n, d, m, meta = _favor_meta(x, w)
    dx = torch.empty_like(x)
    _launch(_favor_bwd, "favor_bwd", (triton.cdiv(n, meta["BN"]), x.shape[0]), x, w, dphi if product else phi,
            dphi.contiguous(), dx, n, d, m, d ** -0.25, PRODUCT=product, **meta)
    return dx


class _FavorFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offset):
        phi = _favor_phi(x, w, offset)
        ctx.save_for_backward(x, w, phi)
        return phi

    @staticmethod
    def backward(ctx, dphi):
        x, w, phi = ctx.saved_tensors
        return _favor_dx(x, w, phi, dphi), None, None


class _CausalFavorAttention(torch.autograd.Function):
    """FAVOR+ features and causal linear attention as one autograd node, for the training path (no running
    state, no padded keys): the chunk kernel hands back dphi * phi for queries and keys, all that the features'
    backward needs, so that backward reads one tensor per input instead of dphi and phi."""

    @staticmethod
    def forward(ctx, xq, xk, v, w, chunk, segment):
        phi_k = _favor_phi(xk, w, favor_key_row_max(xk, w).amax(-1))
        o, _, _, saved = _attention_forward(_favor_phi(xq, w, None), phi_k, v, None, None, chunk, segment)
        ctx.save_for_backward(xq, xk, w, *saved)
        ctx.chunk, ctx.segment = chunk, segment
        return o

    @staticmethod
    def backward(ctx, do):
        xq, xk, w, *saved = ctx.saved_tensors
        dlq, dlk, dv, _, _ = _attention_backward(saved, do, None, None, ctx.chunk, ctx.segment, False, epi=1)
        return _favor_dx(xq, w, None, dlq, True), _favor_dx(xk, w, None, dlk, True), dv, None, None, None


def causal_favor_attention(q, k, v, projection, chunk: int | None = None, segment: int | None = None):
    """Causal FAVOR+ attention of q, k, v (b, h, n, d) with `projection` (m, d): favor_features then
    causal_linear_attention (the keys' offset their max), fused into one autograd node. Computes in q's dtype
    (fp16 -> bf16); returns (b, h, n, dv) in v's dtype."""
    b, hh, n, d = q.shape
    dt = torch.bfloat16 if q.dtype in (torch.bfloat16, torch.float16) else torch.float32
    xq, xk, vv = (t.to(dt).reshape(b * hh, n, t.shape[-1]).contiguous() for t in (q, k, v))
    o = _CausalFavorAttention.apply(xq, xk, vv, projection.to(dt).contiguous(), chunk or CHUNK, segment or SEGMENT)
    return o.reshape(b, hh, n, -1).to(v.dtype)


def favor_key_row_max(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """(bh, n, d) keys -> (bh, n) fp32: each key's largest logit (the offset is their max over valid keys)."""
    n, d, m, meta = _favor_meta(x, w)
    out = torch.empty(x.shape[0], n, device=x.device, dtype=torch.float32)
    _launch(_favor_fwd, "favor_fwd", (triton.cdiv(n, meta["BN"]), x.shape[0]), x, w, out, out, out, n, d, m,
            d ** -0.25, m ** -0.5, MODE=1, FLOOR=LOG_FLOOR, ONE_TILE=m <= meta["BM"], **meta)
    return out


def favor_features(x: torch.Tensor, projection: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """FAVOR+ features of x (b, h, n, d) in x's dtype (fp16 -> bf16): offset None -> each row minus its own
    max (queries); else minus offset (b, h, 1, 1), one constant per (batch, head) (keys)."""
    b, hh, n, d = x.shape
    dt = torch.bfloat16 if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    xx = x.to(dt).reshape(b * hh, n, d).contiguous()
    w = projection.to(dt).contiguous()  # bf16 rows are just another draw of nearly the same directions
    off = None if offset is None else offset.float().expand(b, hh, 1, 1).reshape(b * hh).contiguous()
    return _FavorFeatures.apply(xx, w, off).reshape(b, hh, n, -1)


def favor_row_max(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    b, hh, n, d = x.shape
    dt = torch.bfloat16 if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    with torch.no_grad():
        out = favor_key_row_max(x.to(dt).reshape(b * hh, n, d).contiguous(), projection.to(dt).contiguous())
    return out.reshape(b, hh, n)


# ------------------------------------------------------------------------------------------ elu + 1 features

@triton.jit
def _elu_fwd(x, phi, T, BLOCK: tl.constexpr, FLOOR: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    xf = tl.load(x + o, mask=o < T, other=0.0).to(tl.float32)
    f = tl.where(xf > 0, xf + 1.0, tl.exp(tl.maximum(tl.minimum(xf, 0.0), FLOOR)))
    tl.store(phi + o, f.to(phi.dtype.element_ty), mask=o < T)


@triton.jit
def _elu_bwd(x, dphi, dx, T, BLOCK: tl.constexpr, FLOOR: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    xf = tl.load(x + o, mask=o < T, other=0.0).to(tl.float32)
    d = tl.load(dphi + o, mask=o < T, other=0.0).to(tl.float32)
    slope = tl.where(xf > 0, 1.0, tl.where(xf > FLOOR, tl.exp(tl.minimum(xf, 0.0)), 0.0))
    tl.store(dx + o, (d * slope).to(dx.dtype.element_ty), mask=o < T)


class _EluFeatures(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        phi = torch.empty_like(x)
        _elu_fwd[(triton.cdiv(x.numel(), 1024),)](x, phi, x.numel(), BLOCK=1024, FLOOR=LOG_FLOOR)
        ctx.save_for_backward(x)
        return phi

    @staticmethod
    def backward(ctx, dphi):
        (x,) = ctx.saved_tensors
        dx = torch.empty_like(x)
        _elu_bwd[(triton.cdiv(x.numel(), 1024),)](x, dphi.contiguous(), dx, x.numel(), BLOCK=1024, FLOOR=LOG_FLOOR)
        return dx


def elu_features(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 (floored at e^-30 as the torch version), one kernel each way, in x's dtype (fp16 -> bf16)."""
    dt = torch.bfloat16 if x.dtype in (torch.bfloat16, torch.float16) else torch.float32
    return _EluFeatures.apply(x.to(dt).contiguous())
