"""Every fast attention path equals the explicit-softmax reference."""
import pytest
import torch

import kernels


def _qkv(b=2, h=4, hkv=4, n=33, d=16, n_q=None, dtype=torch.float32, device="cpu"):
    n_q = n_q or n
    q = torch.randn(b, h, n_q, d, dtype=dtype, device=device)
    k = torch.randn(b, hkv, n, d, dtype=dtype, device=device)
    v = torch.randn(b, hkv, n, d, dtype=dtype, device=device)
    return q, k, v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hkv", [4, 2, 1])  # MHA, GQA, MQA
@pytest.mark.parametrize("n", [1, 17, 64])
def test_sdpa_equals_reference(causal, hkv, n):
    q, k, v = _qkv(hkv=hkv, n=n)
    ref = kernels.attention_reference(q, k, v, causal=causal)
    out = kernels.attention_sdpa(q, k, v, causal=causal)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_padding_mask_equals_reference(causal):
    q, k, v = _qkv(hkv=2, n=20)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, 13:] = False
    ref = kernels.attention_reference(q, k, v, causal=causal, key_padding_mask=mask)
    out = kernels.attention_sdpa(q, k, v, causal=causal, key_padding_mask=mask)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isfinite(out).all()


def test_causal_with_kv_cache_offsets_queries_to_the_end():
    """3 new queries over 10 keys: query i sees keys 0..7+i, the same rows as the full causal pass."""
    q, k, v = _qkv(n=10)
    full = kernels.attention_reference(q, k, v, causal=True)
    tail = q[:, :, -3:]
    for impl in (kernels.attention_reference, kernels.attention_sdpa):
        torch.testing.assert_close(impl(tail, k, v, causal=True), full[:, :, -3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hkv", [4, 2, 1])
def test_one_decoding_query_sees_every_cached_key(hkv):
    """A decoding step (one query at the end of the keys) runs unmasked, GQA native: the last row of the full
    causal pass, for MHA, GQA and MQA."""
    q, k, v = _qkv(n=10, hkv=hkv)
    full = kernels.attention_reference(q, k, v, causal=True)
    torch.testing.assert_close(kernels.attention_sdpa(q[:, :, -1:], k, v, causal=True), full[:, :, -1:],
                               atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_heads():
    q, k, v = _qkv(hkv=2)
    out = kernels.attention(q, k, v, causal=True)
    rep = kernels.attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), causal=True)
    torch.testing.assert_close(out, rep, atol=1e-6, rtol=1e-6)


def test_bad_backend_and_heads_are_named():
    q, k, v = _qkv(hkv=3, h=4)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        kernels.attention(q, k, v)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="valid choices: auto, reference, sdpa, flash"):
        kernels.attention(q, k, v, backend="triton")


def test_flash_backend_fails_loudly_when_missing():
    if kernels.flash_attn_available():
        pytest.skip("flash-attn is installed")
    q, k, v = _qkv()
    with pytest.raises(RuntimeError, match="flash-attn"):
        kernels.attention(q, k, v, backend="flash")


@pytest.mark.parametrize("capability,sdpa", [((8, 0), False), ((8, 9), False), ((9, 0), True), ((10, 0), True)])
def test_auto_leaves_flash_attn_for_sdpa_from_hopper_on(monkeypatch, capability, sdpa):
    from kernels import softmax_attention as sa
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    sa._sdpa_beats_flash_attn.cache_clear()
    try:
        assert sa._sdpa_beats_flash_attn(0) is sdpa
    finally:
        sa._sdpa_beats_flash_attn.cache_clear()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_cuda_backends_equal_reference(dtype, causal):
    q, k, v = _qkv(n=257, d=64, hkv=2, dtype=dtype, device="cuda")
    ref = kernels.attention_reference(q.float(), k.float(), v.float(), causal=causal)
    torch.testing.assert_close(kernels.attention_sdpa(q, k, v, causal=causal).float(), ref, atol=2e-2, rtol=2e-2)
    if kernels.flash_attn_available():
        torch.testing.assert_close(kernels.attention_flash(q, k, v, causal=causal).float(), ref, atol=2e-2, rtol=2e-2)
