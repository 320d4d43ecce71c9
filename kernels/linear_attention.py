"""Linear (kernelized) attention: out_i = phi(q_i) . sum_j phi(k_j) v_j^T / phi(q_i) . sum_j phi(k_j).

Feature maps:
- FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers"): positive random features
  phi(x) = exp(w . x^ - |x^|^2 / 2) / sqrt(m) with x^ = x / d^(1/4), so that E[phi(q) . phi(k)] =
  exp(q . k / sqrt(d)), the softmax kernel; w are Gaussian rows, optionally made exactly orthogonal
  in blocks of d (lower variance, the paper's claim, tested).
- the generalized ReLU kernel of the same paper: relu(w . x^) + eps; or relu(x) + eps with no projection
  (LRA's Performer).
- elu(x) + 1 (Katharopoulos et al. 2020, "Transformers are RNNs").

Attention given the features:
- bidirectional: two matmuls through the (m, d_v) state, O(n). The features are m wide (FAVOR+: 256 against a
  head of 64), so what the backward keeps of them decides the layer's memory. `bidirectional_linear_attention`
  is the computation as one autograd node that keeps the features in their own dtype (plain autograd over
  `linear_attention` also keeps their float32 copies); `recomputed_bidirectional_linear_attention` keeps q, k,
  v instead and recomputes the features in its backward.
- causal: a chunked prefix-sum scan. Inside a chunk of C positions the masked quadratic form is
  computed directly (C x C); across chunks a running state S = sum phi(k) v^T, z = sum phi(k) is
  carried by a cumulative sum over chunk states. No n x n matrix and no Python loop over positions;
  memory is O(n (m + C) + (n / C) m d_v), linear in n. The final state is returned so that a decoder
  can continue from it one token at a time (a KV cache of constant size).
- a quadratic masked reference for tests.

The torch code computes in float32 at least: exp() features and long cumulative sums are not safe in
half precision. Layout: (batch, heads, seq, dim); GQA is the caller's business (expand kv heads).

Implementations (`impl=`): "chunked" is the torch scan above (any device, the reference for the kernels);
"triton" is kernels/linear_attention_triton.py (causal attention, the FAVOR+ and elu+1 feature maps; bf16 matmuls
with fp32 accumulation, fp32 normaliser and states); "auto" takes triton on CUDA when triton is importable and
the input is not float64, the torch scan elsewhere. Bidirectional attention is two matmuls either way.
"""
from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F

RELU_EPS = 1e-3  # Performer's kernel_epsilon: keeps the denominator away from zero for all-negative projections


# exp() of very negative numbers gives subnormal floats, which many CPUs process far slower, and products of
# two such features underflow; a floor of e^-30 relative to the largest feature (a precaution, not a measured
# fix) changes outputs by ~1e-13 relative and keeps products of two features normal in float32. The price:
# a key whose logit is > 30 below the per-(batch, head) maximum counts as e^-30, not as less.
_LOG_FLOOR = -30.0


def _exp(x: torch.Tensor) -> torch.Tensor:
    return torch.exp(x.clamp_min(_LOG_FLOOR))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


IMPLS = ("auto", "chunked", "triton")


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_impl(impl: str, x: torch.Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"linear attention impl={impl!r}; valid choices: {', '.join(IMPLS)}")
    if impl == "triton" and not triton_available():
        raise ValueError("linear attention impl='triton' needs the triton package (pip install triton); "
                         "valid choices without it: auto, chunked")
    if impl == "auto":
        return "triton" if x.is_cuda and x.dtype != torch.float64 and triton_available() else "chunked"
    return impl


def _triton():
    from kernels import linear_attention_triton
    return linear_attention_triton


def random_projection(nb_features: int, dim: int, *, orthogonal: bool = True, seed: int = 0,
                      device=None) -> torch.Tensor:
    """(nb_features, dim) Gaussian directions for FAVOR+, drawn in float64 on the CPU from `seed`, so that
    the same seed gives the same features on any device and any rank.

    orthogonal: rows come in blocks of `dim` exactly orthogonal directions (QR of a Gaussian matrix),
    each rescaled to the norm of an independent Gaussian vector, so that every row is still marginally
    N(0, I) (the estimator stays unbiased) while rows in a block are orthogonal (lower variance)."""
    g = torch.Generator().manual_seed(int(seed))
    n_blocks = math.ceil(nb_features / dim)
    gauss = torch.randn(n_blocks, dim, dim, generator=g, dtype=torch.float64, device="cpu")
    if orthogonal:
        q, r = torch.linalg.qr(gauss)
        # fix QR's sign ambiguity so that the blocks are Haar-distributed rotations
        q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
        rows = q.transpose(-1, -2).reshape(-1, dim)[:nb_features]
        norms = torch.randn(nb_features, dim, generator=g, dtype=torch.float64, device="cpu").norm(dim=-1, keepdim=True)
        rows = rows * norms
    else:
        rows = gauss.reshape(-1, dim)[:nb_features]
    return rows.to(device=device, dtype=torch.float32)


def _project(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    with torch.autocast(x.device.type, enabled=False):  # exp() of a bf16 logit is off by up to 1/128 relative x |logit|
        return x @ projection.to(x.dtype).T


def favor_logits(x: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """log of the unnormalised positive softmax-kernel features: w . x^ - |x^|^2 / 2, (..., n, m)."""
    x = x.to(_compute_dtype(x)) * x.shape[-1] ** -0.25
    return _project(x, projection) - 0.5 * (x * x).sum(-1, keepdim=True)


def favor_query_features(logits: torch.Tensor) -> torch.Tensor:
    # each query's own max is subtracted: a per-query factor cancels between numerator and denominator
    return _exp(logits - logits.amax(-1, keepdim=True)) * logits.shape[-1] ** -0.5


def favor_key_offset(logits: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
    """The stabiliser for keys: one constant per (batch, head), the max over valid keys and features.
    A constant shared by every key a query sees cancels in the ratio; a per-key one would not."""
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask[:, None, :, None], float("-inf"))
    off = logits.amax(dim=(-2, -1), keepdim=True)
    return torch.nan_to_num(off, neginf=0.0)  # a batch row with no valid key


def favor_key_features(logits: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return _exp(logits - offset) * logits.shape[-1] ** -0.5


def favor_features(q: torch.Tensor, k: torch.Tensor, projection: torch.Tensor, key_padding_mask=None,
                   offset=None, impl: str = "auto"):
    """FAVOR+ features of queries and keys: (phi_q, phi_k with padded keys zero, key offset (b, h, 1, 1)).
    `offset`: a decoder's running key offset; the new one is the max of it and this step's keys' max.
    impl "chunked" (torch, float32) or "triton" (one fused kernel per tensor, features in the inputs' dtype)."""
    if choose_impl(impl, q) == "triton":
        lat = _triton()
        row_max = lat.favor_row_max(k, projection)
        if key_padding_mask is not None:
            row_max = row_max.masked_fill(~key_padding_mask[:, None, :], float("-inf"))
        new = torch.nan_to_num(row_max.amax(-1)[..., None, None], neginf=0.0)
        if offset is not None:
            new = torch.maximum(new, offset)
        phi_k = mask_keys(lat.favor_features(k, projection, new), key_padding_mask)
        return lat.favor_features(q, projection), phi_k, new
    phi_k, new = _FavorKeys.apply(k, projection, key_padding_mask, offset)
    return _FavorQueries.apply(q, projection), phi_k, new


def favor_features_reference(q, k, projection, key_padding_mask=None, offset=None):
    """favor_features' torch path as plain autograd ops: the reference for the fused nodes below."""
    lq, lk = favor_logits(q, projection), favor_logits(k, projection)
    new = _key_offset(lk, key_padding_mask, offset)
    return favor_query_features(lq), mask_keys(favor_key_features(lk, new), key_padding_mask), new


def _key_offset(logits, key_padding_mask, offset):
    new = favor_key_offset(logits, key_padding_mask)
    return new if offset is None else torch.maximum(new, offset)


# The torch path's features as autograd nodes that keep only x and phi. Plain autograd would also keep the
# logits and the exp's input and output: m-wide float32 tensors, 4x the memory of phi for each of q and k. As in
# the Triton kernels, the stabilising max is a constant in the backward: the output does not depend on it (it
# cancels in the ratio), so its true gradient is zero up to rounding.
class _FavorQueries(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, projection):
        phi = favor_query_features(favor_logits(x, projection))
        ctx.save_for_backward(x, projection, phi)
        return phi

    @staticmethod
    def backward(ctx, d_phi):
        return _favor_dx(*ctx.saved_tensors, d_phi), None


class _FavorKeys(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, projection, key_padding_mask, offset):
        logits = favor_logits(x, projection)
        new = _key_offset(logits, key_padding_mask, offset)
        phi = mask_keys(favor_key_features(logits, new), key_padding_mask)
        ctx.save_for_backward(x, projection, phi)
        ctx.mark_non_differentiable(new)
        return phi, new

    @staticmethod
    def backward(ctx, d_phi, _d_offset):
        return _favor_dx(*ctx.saved_tensors, d_phi), None, None, None


def _favor_dx(x, projection, phi, d_phi):
    """x's gradient through phi = exp(max(l - c, floor)) / sqrt(m), l = w . x^ - |x^|^2 / 2, x^ = x / d^(1/4):
    dl = d_phi * phi where the floor did not bind (padded keys have phi = 0, so nothing flows to them)."""
    scale = x.shape[-1] ** -0.25
    floor = torch.exp(torch.tensor(_LOG_FLOOR, dtype=phi.dtype)) * phi.shape[-1] ** -0.5  # as the forward rounds it
    with torch.autocast(x.device.type, enabled=False):
        d_l = d_phi.to(phi.dtype) * phi * (phi > floor)
        xs = x.to(phi.dtype) * scale
        d_x = d_l @ projection.to(phi.dtype) - xs * d_l.sum(-1, keepdim=True)
    return (d_x * scale).to(x.dtype)


def causal_favor_attention(q, k, v, projection, key_padding_mask=None, chunk_size: int = 64, impl: str = "auto"):
    """Causal FAVOR+ attention of queries, keys, values (b, h, n, d), no running state (the training path):
    favor_features then linear_attention. On triton without padded keys, one fused autograd node
    (kernels/linear_attention_triton.causal_favor_attention, the same result)."""
    if key_padding_mask is None and choose_impl(impl, q) == "triton":
        with torch.autocast(q.device.type, enabled=False):
            return _triton().causal_favor_attention(q, k, v, projection)
    phi_q, phi_k, _ = favor_features(q, k, projection, key_padding_mask, impl=impl)
    return linear_attention(phi_q, phi_k, v, causal=True, chunk_size=chunk_size, impl=impl)[0]


def relu_features(x: torch.Tensor, projection: torch.Tensor | None) -> torch.Tensor:
    """relu(w . x^) + eps; projection None: relu(x) + eps on x itself, unscaled (LRA's Performer:
    generalized attention with `features_type='deterministic'`)."""
    x = x.to(_compute_dtype(x))
    if projection is None:
        return F.relu(x) + RELU_EPS
    return F.relu(_project(x * x.shape[-1] ** -0.25, projection)) + RELU_EPS


def elu_features(x: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    if choose_impl(impl, x) == "triton":
        return _triton().elu_features(x)
    # elu(x) + 1 written as exp(x) below 0: exact where `expm1(x) + 1` rounds to 0, and floored (above)
    x = x.to(_compute_dtype(x))
    return torch.where(x > 0, x + 1.0, _exp(torch.minimum(x, torch.zeros((), dtype=x.dtype))))


def mask_keys(phi_k: torch.Tensor, key_padding_mask=None) -> torch.Tensor:
    """Padded keys contribute nothing: their features are zero (not merely small)."""
    if key_padding_mask is None:
        return phi_k
    return phi_k * key_padding_mask[:, None, :, None].to(phi_k.dtype)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    # a query that sees no valid key has a zero denominator: give it zeros, as the softmax reference does, and a
    # zero gradient (dividing by a clamped tiny denominator overflowed the gradient to inf, then 0 * inf = nan)
    ok = den > 0
    return torch.where(ok[..., None], num / torch.where(ok, den, 1.0)[..., None], 0.0)


def linear_attention(phi_q, phi_k, v, *, causal: bool, chunk_size: int = 64, state=None, impl: str = "auto"):
    """Linear attention from features. phi_q (b, h, n, m), phi_k (b, h, n, m) with padded keys already
    zero, v (b, h, n, dv). `state` = (S (b, h, m, dv), z (b, h, m)) from earlier positions (causal only).
    Returns (out (b, h, n, dv) in v's dtype, final state). `chunk_size` is the torch scan's; the Triton
    kernel uses its own tile (the result does not depend on it)."""
    if causal and choose_impl(impl, phi_q) == "triton":
        with torch.autocast(phi_q.device.type, enabled=False):
            return _triton().causal_linear_attention(phi_q, phi_k, v, state)
    # under bf16 autocast the matmuls below would run in bf16 and the state sums would lose their precision
    with torch.autocast(phi_q.device.type, enabled=False):
        phi_q, phi_k = phi_q.to(_compute_dtype(phi_q)), phi_k.to(_compute_dtype(phi_k))
        vf = v.to(phi_q.dtype)
        if not causal:
            if state is not None:
                raise ValueError("a bidirectional linear attention has no running state to continue from")
            out, s, z, _ = _bidirectional_parts(phi_q, phi_k, vf)
            return out.to(v.dtype), (s, z)
        return _causal_chunked(phi_q, phi_k, vf, chunk_size, state, v.dtype)


def bidirectional_linear_attention(phi_q, phi_k, v):
    """`linear_attention(phi_q, phi_k, v, causal=False)[0]` as one autograd node that keeps the features in the
    dtype they come in (bf16 from the Triton feature kernels) and the (m, d_v) state: plain autograd would also
    keep the float32 copies that the matmuls read, twice the memory of bf16 features."""
    return _StoredBidirectional.apply(phi_q, phi_k, v)


def recomputed_bidirectional_linear_attention(features, q, k, v):
    """The same from q and k, as one autograd node that keeps q, k, v and the state and recomputes
    `features(q, k)` -> (phi_q, phi_k) in its backward: no m-wide tensor is kept. `features` must give the same
    features when called again (a Performer redraw between a forward and its backward would break that:
    PerformerCore checks it)."""
    return _RecomputedBidirectional.apply(features, q, k, v)


def _bidirectional_parts(phi_q, phi_k, v):
    phi_q, phi_k = phi_q.to(_compute_dtype(phi_q)), phi_k.to(_compute_dtype(phi_k))
    s, z = phi_k.transpose(-1, -2) @ v.to(phi_q.dtype), phi_k.sum(-2)
    den = (phi_q * z[..., None, :]).sum(-1)
    return _ratio(phi_q @ s, den), s, z, den


def _bidirectional_backward(phi_q, phi_k, v, out, s, z, den, d_out):
    """(d phi_q, d phi_k, d v) of out = phi_q s / phi_q . z, s = phi_k^T v, z = sum phi_k; each in its input's dtype."""
    with torch.no_grad(), torch.autocast(v.device.type, enabled=False):
        pq, pk = phi_q.to(out.dtype), phi_k.to(out.dtype)
        ok = den > 0  # a query with no valid key: zero output and zero gradient, as _ratio
        g = torch.where(ok[..., None], d_out.to(out.dtype) / torch.where(ok, den, 1.0)[..., None], 0.0)
        d_den = -(g * out).sum(-1, keepdim=True)
        d_pq = g @ s.transpose(-1, -2) + d_den * z[..., None, :]
        d_s, d_z = pq.transpose(-1, -2) @ g, (pq * d_den).sum(-2)
        d_pk = v.to(out.dtype) @ d_s.transpose(-1, -2) + d_z[..., None, :]
        d_v = pk @ d_s
    return d_pq.to(phi_q.dtype), d_pk.to(phi_k.dtype), d_v.to(v.dtype)


class _StoredBidirectional(torch.autograd.Function):
    @staticmethod
    def forward(ctx, phi_q, phi_k, v):
        with torch.autocast(v.device.type, enabled=False):
            out, s, z, den = _bidirectional_parts(phi_q, phi_k, v)
        ctx.save_for_backward(phi_q, phi_k, v, out, s, z, den)
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, d_out):
        return _bidirectional_backward(*ctx.saved_tensors, d_out)


class _RecomputedBidirectional(torch.autograd.Function):
    @staticmethod
    def forward(ctx, features, q, k, v):
        phi_q, phi_k = features(q, k)
        with torch.autocast(v.device.type, enabled=False):
            out, s, z, den = _bidirectional_parts(phi_q, phi_k, v)
        ctx.features = features
        ctx.save_for_backward(q, k, v, out, s, z, den)
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, d_out):
        q, k, v, out, s, z, den = ctx.saved_tensors
        with torch.enable_grad():
            qg, kg = q.detach().requires_grad_(), k.detach().requires_grad_()
            phi_q, phi_k = ctx.features(qg, kg)
        d_pq, d_pk, d_v = _bidirectional_backward(phi_q.detach(), phi_k.detach(), v, out, s, z, den, d_out)
        d_q, d_k = torch.autograd.grad((phi_q, phi_k), (qg, kg), (d_pq, d_pk))
        return None, d_q, d_k, d_v


def _causal_chunked(phi_q, phi_k, v, chunk: int, state, out_dtype):
    b, h, n, m = phi_q.shape
    dv = v.shape[-1]
    chunk = max(1, min(chunk, n))
    pad = (-n) % chunk
    if pad:  # zero keys/queries at the end: zero keys add nothing, padded queries are dropped
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    nc = (n + pad) // chunk
    qc, kc, vc = (t.reshape(b, h, nc, chunk, t.shape[-1]) for t in (phi_q, phi_k, v))
    # within a chunk: the masked quadratic form (C x C, never n x n)
    scores = (qc @ kc.transpose(-1, -2)).tril()
    num = scores @ vc
    den = scores.sum(-1)
    # across chunks: each chunk's contribution to the state, then an exclusive prefix sum over chunks
    s_chunk = kc.transpose(-1, -2) @ vc  # (b, h, nc, m, dv)
    z_chunk = kc.sum(-2)  # (b, h, nc, m)
    s_incl, z_incl = s_chunk.cumsum(2), z_chunk.cumsum(2)
    s_prev, z_prev = s_incl - s_chunk, z_incl - z_chunk
    s_final, z_final = s_incl[:, :, -1], z_incl[:, :, -1]
    if state is not None:
        s0, z0 = (t.to(phi_q.dtype) for t in state)
        s_prev, z_prev = s_prev + s0[:, :, None], z_prev + z0[:, :, None]
        s_final, z_final = s_final + s0, z_final + z0
    num = num + qc @ s_prev
    den = den + (qc * z_prev[..., None, :]).sum(-1)
    out = _ratio(num, den).reshape(b, h, nc * chunk, dv)[:, :, :n]
    return out.to(out_dtype), (s_final, z_final)


def linear_attention_reference(phi_q, phi_k, v, *, causal: bool):
    """The plain quadratic form: A = phi(Q) phi(K)^T, masked lower-triangular when causal, rows
    normalised by their sums. Queries sit at the end of the key sequence (as with a cache)."""
    with torch.autocast(phi_q.device.type, enabled=False):
        return _reference(phi_q, phi_k, v, causal)


def _reference(phi_q, phi_k, v, causal):
    scores = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        n_q, n_k = scores.shape[-2:]
        scores = scores * torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril(n_k - n_q)
    return _ratio(scores @ v.to(scores.dtype), scores.sum(-1)).to(v.dtype)
