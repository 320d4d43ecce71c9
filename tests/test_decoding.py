"""Static KV cache and CUDA-graph decoding (zoo.models.decoding) reduce to the growing cache."""
import pytest
import torch

import zoo
from zoo.models import decoding

MODELS = {  # (name, overrides): learned positions + MHA; RoPE + GQA + MoE; MQA
    "gpt": ("gpt", {}),
    "mixtral_gqa": ("mixtral", {"n_kv_heads": 2, "n_experts": 4, "moe_top_k": 2, "d_ff": 48}),
    "mixtral_mqa": ("mixtral", {"n_kv_heads": 1, "n_experts": 4, "moe_top_k": 1, "d_ff": 48}),
}


def tiny(key, device="cpu"):
    name, kw = MODELS[key]
    torch.manual_seed(0)
    base = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, dropout=0.0)
    return zoo.build_model(name, **{**base, **kw}).to(device).eval()


@pytest.mark.parametrize("key", sorted(MODELS))
def test_static_cache_generates_what_the_growing_cache_does(key):
    m = tiny(key)
    prompt = torch.randint(0, 97, (3, 7))
    want = m.generate(prompt, 20, temperature=0)
    assert torch.equal(m.generate(prompt, 20, temperature=0, kv_cache="static"), want)
    sampled = [m.generate(prompt, 12, temperature=0.8, top_k=10, kv_cache=kv, generator=torch.Generator().manual_seed(3))
               for kv in ("dynamic", "static")]
    assert torch.equal(*sampled)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_static_cache_steps_equal_the_full_pass(key):
    """Prefill 5 tokens, then one token per step at a device-side position: each step's logits are the full
    causal pass's at that position."""
    m = tiny(key)
    x = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = m(x)
        cache = decoding.static_cache(m, 12, x.device)
        steps = [m(x[:, :5], cache=cache)]
        for i in range(5, 12):
            cache[0]["pos"].fill_(i)
            steps.append(m(x[:, i:i + 1], start_pos=cache[0]["pos"], cache=cache))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_static_cache_refuses_what_it_cannot_decode_before_any_work():
    m = tiny("gpt")
    prompt = torch.randint(0, 97, (1, 60))
    with pytest.raises(ValueError, match="valid choices: dynamic, static, cuda_graph"):
        m.generate(prompt, 2, kv_cache="paged")
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=64; use kv_cache='dynamic'"):
        m.generate(prompt, 10, kv_cache="static")
    assert m.generate(prompt, 10, temperature=0).shape == (1, 70)  # the growing cache recomputes past it
    with pytest.raises(ValueError, match="needs the model on a CUDA device; use kv_cache='static'"):
        m.generate(prompt[:, :4], 2, kv_cache="cuda_graph")
    window = zoo.build_model("gpt", vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                             attention={"core": "sliding_window", "window": 8}).eval()
    with pytest.raises(ValueError, match="needs full or causal softmax attention.*'sliding_window'"):
        window.generate(prompt[:, :4], 2, kv_cache="static")
    with pytest.raises(ValueError, match="pass no attention_mask"):
        m(prompt[:, :4], attention_mask=torch.ones(1, 4), cache=decoding.static_cache(m, 8, "cpu"))


@pytest.mark.gpu
@pytest.mark.parametrize("key", sorted(MODELS))
def test_cuda_graph_decoding_replays_the_static_steps(key):
    m = tiny(key, "cuda").to(torch.bfloat16)
    prompt = torch.randint(0, 97, (4, 9), device="cuda")
    want = m.generate(prompt, 24, temperature=0, kv_cache="static")
    assert torch.equal(m.generate(prompt, 24, temperature=0, kv_cache="cuda_graph"), want)
