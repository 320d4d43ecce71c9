"""LSH attention (Kitaev et al. 2020, "Reformer"), as Trax and transformers' LSHSelfAttention compute it.

Shared-QK attention where each token only scores the keys that hash near it:
1. hash: random rotations R (heads, head_dim, n_hashes, n_buckets / 2); bucket = argmax([xR, -xR]) (angular LSH).
   Padding (the caller's and the one added here to reach a multiple of `chunk_length`) goes to an extra last
   bucket, so it sorts after every real token and never shares a chunk with one it could displace.
2. sort the (hash round, bucket, position) triples; cut the sorted sequence of all rounds into chunks of
   `chunk_length`; each chunk attends to itself and the previous chunk (the first chunk of a round sees the
   last chunk of the round before, and the very first the very last: the same wrap-around as Trax/HF).
3. keys are the queries normalised to unit length (with shared QK, q.k of a token with itself would
   otherwise dominate); there is no extra 1/sqrt(d) scale, the key normalisation plays that role.
4. masks use large finite values as HF does: -1e9 for causal/padding, -1e5 for a token's own key (it is
   attended only when nothing else is), so a row never becomes NaN and a round in which a token sees
   nothing weighs exp(-1e5) ~ 0 next to a round in which it does.
5. each round gives an output and the log-sum-exp of its scores; rounds combine with softmax weights over
   those log-sum-exps (a key met in two rounds counts twice, as in the paper and HF).

Memory is O(n_hashes * N * chunk_length) per head. `lsh_attention_reference` computes the same function with
a dense (rounds * N)^2 mask, independently of the gather/chunk mechanics; `shared_qk_attention_reference` is
full shared-QK attention with the self-mask rule, which LSH equals when one chunk holds the whole sequence.
"""
from __future__ import annotations

import math

import torch

MASK_VALUE = -1e9  # causal and padding (HF: mask_value_float32)
SELF_MASK_VALUE = -1e5  # a token's own key (HF: self_mask_value_float32)
_NORM_EPS = 1e-6


def default_n_buckets(n: int, chunk_length: int) -> int:
    """HF's rule when num_buckets is unset: about two buckets per chunk, a power of two, at least 2."""
    return max(2, 2 ** ((2 * (n // chunk_length)).bit_length() - 1))


def random_rotations(n_heads: int, head_dim: int, n_hashes: int, n_buckets: int, seed: int,
                     dtype=torch.float32) -> torch.Tensor:
    """(heads, head_dim, n_hashes, n_buckets // 2) on CPU. A private generator makes the hashing reproducible
    without touching the global RNG; its draws equal HF's `torch.manual_seed(hash_seed); torch.randn(...,
    dtype=the activations' dtype)` on CPU, which is what weight conversion relies on (float64 draws are not
    float32 draws widened, hence `dtype`)."""
    if n_buckets < 2 or n_buckets % 2:
        raise ValueError(f"attention.n_buckets={n_buckets} must be an even integer >= 2 (angular LSH uses +-rotations)")
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n_heads, head_dim, n_hashes, n_buckets // 2), generator=g, dtype=dtype)


def hash_buckets(qk: torch.Tensor, rotations: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Bucket of every token in every round: (B, H, n_hashes, N) long, in [0, n_buckets]; n_buckets = padding."""
    acc = torch.promote_types(qk.dtype, torch.float32)  # bf16/fp16 would flip near-tie argmaxes
    rotated = torch.einsum("bhnd,hdrk->bhrnk", qk.detach().to(acc), rotations.to(qk.device, acc))
    buckets = torch.cat([rotated, -rotated], dim=-1).argmax(dim=-1)
    if valid is not None:
        buckets = buckets.masked_fill(~valid[:, None, None, :], 2 * rotations.shape[-1])
    return buckets


def normalize_keys(qk: torch.Tensor) -> torch.Tensor:
    """HF's `_len_and_dim_norm`: x / sqrt(mean(x^2) + eps) / sqrt(d), i.e. about unit length."""
    var = qk.pow(2).mean(-1, keepdim=True)
    return qk * torch.rsqrt(var + _NORM_EPS) / math.sqrt(qk.shape[-1])


def _prepare(qk, v, chunk_length, key_padding_mask):
    """Pad the sequence to a multiple of chunk_length; return the padded tensors and the validity mask."""
    b, _, n, _ = qk.shape
    n_pad = -(-n // chunk_length) * chunk_length
    valid = key_padding_mask.bool() if key_padding_mask is not None else None
    if n_pad != n:
        extra = n_pad - n
        qk = torch.cat([qk, qk.new_zeros(*qk.shape[:2], extra, qk.shape[-1])], dim=2)
        v = torch.cat([v, v.new_zeros(*v.shape[:2], extra, v.shape[-1])], dim=2)
        if valid is None:
            valid = torch.ones(b, n, dtype=torch.bool, device=qk.device)
        valid = torch.cat([valid, valid.new_zeros(b, extra)], dim=1)
    return qk, v, valid, n_pad


def sort_order(buckets: torch.Tensor, n_buckets: int) -> torch.Tensor:
    """(B, H, R * N) indices into the rounds-concatenated sequence, sorted by (round, bucket, position)."""
    _, _, r, n = buckets.shape
    n_b = n_buckets + 1  # + the padding bucket
    rounds = torch.arange(r, device=buckets.device)[:, None]
    pos = torch.arange(n, device=buckets.device)
    key = (rounds * n_b + buckets) * n + pos  # unique, so the sort needs no stability
    return key.flatten(2).argsort(dim=-1)


def _combine_rounds(out: torch.Tensor, lse: torch.Tensor, r: int) -> torch.Tensor:
    """out (B, H, R*N, D), lse (B, H, R*N) in round-major original order -> (B, H, N, D)."""
    b, h, rn, d = out.shape
    out, lse = out.view(b, h, r, rn // r, d), lse.view(b, h, r, rn // r)
    w = torch.softmax(lse, dim=2)
    return (out * w[..., None]).sum(dim=2)


def lsh_attention(qk, v, rotations, chunk_length: int, causal: bool, key_padding_mask=None,
                  dropout_p: float = 0.0, generator=None):
    """qk, v: (B, H, N, D) (qk = the shared query/key projection); rotations from `random_rotations`.
    Returns (B, H, N, D). N need not be a multiple of chunk_length (padded inside, cropped on return)."""
    b, h, n, d = qk.shape
    r = rotations.shape[2]
    acc = torch.promote_types(qk.dtype, torch.float32)  # scores in float32 at least: the mask values need it
    qk_p, v_p, valid, n_pad = _prepare(qk, v, chunk_length, key_padding_mask)
    buckets = hash_buckets(qk_p, rotations, valid)
    order = sort_order(buckets, 2 * rotations.shape[-1])  # (B, H, R*Np)
    tok = order % n_pad  # the original position of each sorted slot
    undo = order.argsort(dim=-1)

    def gather(x):
        return x.gather(2, tok[..., None].expand(-1, -1, -1, x.shape[-1]))

    n_chunks = r * n_pad // chunk_length
    q_s = gather(qk_p).to(acc).view(b, h, n_chunks, chunk_length, d)
    v_s = gather(v_p).to(acc).view(b, h, n_chunks, chunk_length, d)
    k_s = normalize_keys(q_s)
    pos_q = tok.view(b, h, n_chunks, chunk_length)

    def look_back(x):  # own chunk and the previous one (rolled: chunk 0 sees the last)
        return torch.cat([x.roll(1, dims=2), x], dim=3)

    k_a, v_a, pos_k = look_back(k_s), look_back(v_s), look_back(pos_q)
    scores = torch.einsum("bhcqd,bhckd->bhcqk", q_s, k_a)
    allowed = None
    if valid is not None:
        key_valid = valid[:, None, :].expand(b, h, n_pad).gather(2, pos_k.flatten(2)).view(pos_k.shape)
        allowed = key_valid[:, :, :, None, :]
    if causal:
        c = pos_q[..., :, None] >= pos_k[..., None, :]
        allowed = c if allowed is None else allowed & c
    if allowed is not None:
        scores = scores.masked_fill(~allowed, MASK_VALUE)
    scores = scores.masked_fill(pos_q[..., :, None] == pos_k[..., None, :], SELF_MASK_VALUE)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    if dropout_p > 0.0:
        keep = torch.rand(probs.shape, generator=generator, device=probs.device) >= dropout_p
        probs = probs * keep / (1.0 - dropout_p)
    out = torch.einsum("bhcqk,bhckd->bhcqd", probs, v_a).reshape(b, h, r * n_pad, d)
    lse = lse.reshape(b, h, r * n_pad)
    out = out.gather(2, undo[..., None].expand(-1, -1, -1, d))  # back to round-major original order
    lse = lse.gather(2, undo)
    return _combine_rounds(out, lse, r)[:, :, :n].to(qk.dtype)


def lsh_attention_reference(qk, v, rotations, chunk_length: int, causal: bool, key_padding_mask=None):
    """The same function as `lsh_attention` from an explicit (R*N) x (R*N) mask over (round, token) pairs:
    (r, i) may score (r', j) when j's slot in the sorted sequence lies in i's chunk or the one before it.
    Quadratic memory; for tests."""
    b, h, n, d = qk.shape
    r = rotations.shape[2]
    acc = torch.promote_types(qk.dtype, torch.float32)
    qk_p, v_p, valid, n_pad = _prepare(qk, v, chunk_length, key_padding_mask)
    order = sort_order(hash_buckets(qk_p, rotations, valid), 2 * rotations.shape[-1])
    slot = order.argsort(dim=-1)  # slot[(round, token)] = its index in the sorted sequence
    chunk = slot // chunk_length
    n_chunks = r * n_pad // chunk_length
    same = chunk[..., :, None] == chunk[..., None, :]
    prev = (chunk[..., :, None] - 1) % n_chunks == chunk[..., None, :]
    # a single chunk is its own previous chunk: HF then sees each key twice, which the count reproduces
    mult = same.to(acc) + prev.to(acc)
    tok = torch.arange(n_pad, device=qk.device).repeat(r)
    x, vv = qk_p.to(acc).repeat(1, 1, r, 1), v_p.to(acc).repeat(1, 1, r, 1)
    scores = torch.einsum("bhqd,bhkd->bhqk", x, normalize_keys(x))
    ok = torch.ones(r * n_pad, r * n_pad, dtype=torch.bool, device=qk.device)[None, None]
    if valid is not None:
        ok = ok & valid.repeat(1, r)[:, None, None, :]
    if causal:
        ok = ok & (tok[:, None] >= tok[None, :])
    scores = scores.masked_fill(~ok, MASK_VALUE)
    scores = scores.masked_fill(tok[:, None] == tok[None, :], SELF_MASK_VALUE)
    # weights: exp(score) times how often the pair meets; pairs that never meet contribute nothing
    scores = scores + torch.log(mult)
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - lse[..., None]), vv)
    return _combine_rounds(out, lse, r)[:, :, :n].to(qk.dtype)


def shared_qk_attention_reference(qk, v, causal: bool, key_padding_mask=None):
    """Full shared-QK attention with LSH's conventions (normalised keys, no 1/sqrt(d), self-mask rule)."""
    n = qk.shape[2]
    acc = torch.promote_types(qk.dtype, torch.float32)
    x = qk.to(acc)
    scores = torch.einsum("bhqd,bhkd->bhqk", x, normalize_keys(x))
    pos = torch.arange(n, device=qk.device)
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask.bool()[:, None, None, :], MASK_VALUE)
    if causal:
        scores = scores.masked_fill(pos[:, None] < pos[None, :], MASK_VALUE)
    scores = scores.masked_fill(pos[:, None] == pos[None, :], SELF_MASK_VALUE)
    return torch.einsum("bhqk,bhkd->bhqd", torch.softmax(scores, dim=-1), v.to(acc)).to(qk.dtype)
