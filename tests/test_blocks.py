"""Shared blocks: attention wiring (GQA, shared QK, RoPE, KV cache), causality, cores' fast = reference."""
import pytest
import torch

import zoo
from zoo.blocks import CORES, RotaryEmbedding, build_core


def tiny(name="gpt", **kw):
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, dropout=0.0)
    return zoo.build_model(name, **{**base, **kw}).eval()


@pytest.mark.parametrize("name", sorted(CORES))
def test_each_core_fast_path_equals_reference(name):
    cls = CORES[name]
    for causal in [c for c in (True, False) if (cls.supports_causal if c else cls.supports_bidirectional)]:
        core = build_core(name, causal=causal).eval()
        q, k, v = (torch.randn(2, 4, 37, 8) for _ in range(3))
        mask = torch.ones(2, 37, dtype=torch.bool)
        mask[1, 30:] = False
        for m in (None, mask):
            torch.testing.assert_close(core(q, k, v, key_padding_mask=m), core.reference(q, k, v, key_padding_mask=m),
                                       atol=1e-5, rtol=1e-5)


def test_gqa_with_all_kv_heads_equals_mha():
    torch.manual_seed(0)
    mha = tiny(n_kv_heads=None)
    torch.manual_seed(0)
    gqa = tiny(n_kv_heads=4)
    x = torch.randint(0, 97, (2, 20))
    torch.testing.assert_close(mha(x), gqa(x))


@pytest.mark.parametrize("kv", [4, 2, 1])
def test_kv_heads_shrink_the_projection_and_the_cache(kv):
    m = tiny(n_kv_heads=kv)
    assert m.trunk.blocks[0].attn.qkv.out_features == (4 + 2 * kv) * 8
    cache = m.new_cache()
    m(torch.randint(0, 97, (1, 5)), cache=cache)
    assert cache[0]["k"].shape == (1, kv, 5, 8)


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 1}, {"position": "rope"}, {"position": "sinusoidal", "ffn": "swiglu",
                                                                              "norm": "rmsnorm"}])
def test_causal_model_never_looks_ahead(kw):
    m = tiny(**kw)
    x = torch.randint(0, 97, (2, 24))
    y = x.clone()
    y[:, 15:] = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(m(x)[:, :15], m(y)[:, :15])
    assert not torch.allclose(m(x)[:, 15:], m(y)[:, 15:])


def test_encoder_does_look_both_ways():
    m = tiny("bert")
    x = torch.randint(0, 97, (1, 16))
    y = x.clone()
    y[0, -1] = (y[0, -1] + 1) % 97
    assert not torch.allclose(m(x)[:, 0], m(y)[:, 0])


@pytest.mark.parametrize("kw", [{}, {"position": "rope", "n_kv_heads": 2}])
def test_kv_cache_decoding_equals_full_forward(kw):
    m = tiny(**kw)
    x = torch.randint(0, 97, (2, 12))
    full = m(x)
    cache = m.new_cache()
    steps = [m(x[:, :5], cache=cache)] + [m(x[:, i : i + 1], start_pos=i, cache=cache) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_greedy_generation_with_cache_equals_without():
    m = tiny()
    prompt = torch.randint(0, 97, (2, 4))
    a = m.generate(prompt, 20, temperature=0, use_cache=True)
    b = m.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_padding_does_not_leak_into_real_tokens():
    m = tiny("bert")
    x = torch.randint(0, 97, (1, 16))
    mask = torch.ones(1, 16, dtype=torch.long)
    mask[0, 10:] = 0
    y = x.clone()
    y[0, 10:] = torch.randint(0, 97, (6,))
    torch.testing.assert_close(m(x, attention_mask=mask)[:, :10], m(y, attention_mask=mask)[:, :10])


def test_rope_is_relative():
    """<R(m)q, R(n)k> depends on m - n only."""
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    dot = lambda m, n: (rope(q, torch.tensor([m])) * rope(k, torch.tensor([n]))).sum()  # noqa: E731
    torch.testing.assert_close(dot(5, 2), dot(13, 10), atol=1e-5, rtol=1e-5)


def test_shared_qk_uses_one_projection_for_queries_and_keys():
    m = tiny(shared_qk=True)
    assert m.trunk.blocks[0].attn.qkv.out_features == 2 * 32
    m(torch.randint(0, 97, (1, 8)))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = tiny().train()
    torch.manual_seed(0)
    b = tiny(activation_checkpointing=True).train()
    x = torch.randint(0, 97, (2, 16))
    a(x).sum().backward()
    b(x).sum().backward()
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
