"""Performer (FAVOR+) and linear attention: the chunked causal scan against the quadratic reference,
incremental decoding against the full pass, the recomputing bidirectional path against the stored one, the
quality of the softmax approximation, redraws."""
from __future__ import annotations

import re

import pytest
import torch

import zoo
from kernels import linear_attention as la
from zoo.blocks.cores import build_core

F64 = dict(dtype=torch.float64)


def qkv(b=2, h=3, n=50, d=16, hk=None, **kw):
    g = torch.Generator().manual_seed(n * 7 + d)
    return (torch.randn(b, h, n, d, generator=g, **kw), torch.randn(b, hk or h, n, d, generator=g, **kw),
            torch.randn(b, hk or h, n, d, generator=g, **kw))


def features(kind, q, k, mask=None, m=64):
    if kind == "elu":
        return la.elu_features(q), la.mask_keys(la.elu_features(k), mask)
    proj = la.random_projection(m, q.shape[-1], seed=3).double()
    if kind == "relu":
        return la.relu_features(q, proj), la.mask_keys(la.relu_features(k, proj), mask)
    lq, lk = la.favor_logits(q, proj), la.favor_logits(k, proj)
    phi_k = la.favor_key_features(lk, la.favor_key_offset(lk, mask))
    return la.favor_query_features(lq), la.mask_keys(phi_k, mask)


@pytest.mark.parametrize("kind", ["elu", "softmax", "relu"])
@pytest.mark.parametrize("n,chunk", [(50, 16), (64, 16), (7, 16), (33, 1), (100, 64)])
def test_causal_chunked_scan_equals_quadratic_reference_fp64(kind, n, chunk):
    q, k, v = qkv(n=n, **F64)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[1, n // 2:] = False
    for m in (None, mask):
        phi_q, phi_k = features(kind, q, k, m)
        out, (s, z) = la.linear_attention(phi_q, phi_k, v, causal=True, chunk_size=chunk)
        ref = la.linear_attention_reference(phi_q, phi_k, v, causal=True)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        # the returned state is the sum over every (unpadded) key
        torch.testing.assert_close(s, phi_k.transpose(-1, -2) @ v, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(z, phi_k.sum(-2), atol=1e-10, rtol=1e-10)


def test_bidirectional_equals_reference_and_padded_keys_count_for_nothing():
    q, k, v = qkv(n=30, **F64)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[0, 20:] = False
    phi_q, phi_k = features("softmax", q, k, mask)
    out, _ = la.linear_attention(phi_q, phi_k, v, causal=False)
    torch.testing.assert_close(out, la.linear_attention_reference(phi_q, phi_k, v, causal=False), atol=1e-10, rtol=0)
    # changing what sits at the padded positions changes nothing
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 20:], v2[0, :, 20:] = 100.0, -7.0
    phi_q2, phi_k2 = features("softmax", q, k2, mask)
    torch.testing.assert_close(la.linear_attention(phi_q2, phi_k2, v2, causal=False)[0], out, atol=1e-10, rtol=0)


@pytest.mark.parametrize("name,options", [("linear", {"chunk_size": 8}), ("performer", {"chunk_size": 8}),
                                          ("performer", {"kernel": "relu", "chunk_size": 5}),
                                          ("performer", {"kernel": "relu", "nb_features": None, "chunk_size": 5})])
def test_core_incremental_decoding_equals_full_pass(name, options):
    core = build_core(name, causal=True, **options).double().eval()
    q, k, v = qkv(n=29, hk=1, **F64)  # MQA: one kv head for three query heads
    full = core(q, k, v)
    torch.testing.assert_close(full, core.reference(q, k, v), atol=1e-10, rtol=1e-10)
    # a prompt of 11 tokens, then one token at a time, then a block of 6
    cache, outs, sizes = {}, [], []
    for a, b in [(0, 11)] + [(i, i + 1) for i in range(11, 23)] + [(23, 29)]:
        outs.append(core(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], cache=cache))
        s, z = cache["state"]
        sizes.append((tuple(s.shape), tuple(z.shape)))
    torch.testing.assert_close(torch.cat(outs, dim=2), full, atol=1e-10, rtol=1e-10)
    # a constant-size state: (S, z) per query head, the same after 11 tokens as after 29; no keys kept
    m = s.shape[-2]
    assert set(sizes) == {((2, 3, m, 16), (2, 3, m))} and "k" not in cache


def test_favor_state_rescales_when_a_later_key_is_larger():
    """The key stabiliser is a running max: a decoding step whose key beats it rescales the stored sums."""
    core = build_core("performer", causal=True, nb_features=32).double().eval()
    q, k, v = qkv(n=12, d=8, **F64)
    k[:, :, 9] *= 6.0  # a much larger key late in the sequence
    cache = {}
    steps = [core(q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], cache=cache) for i in range(12)]
    torch.testing.assert_close(torch.cat(steps, 2), core(q, k, v), atol=1e-10, rtol=1e-10)


def tiny(name="gpt", **kw):
    return zoo.build_model(name, n_layers=2, d_model=32, n_heads=4, max_seq_len=64, vocab_size=61, **kw).eval()


@pytest.mark.parametrize("attention", ["performer", "linear"])
def test_model_generate_with_state_equals_without(attention):
    torch.manual_seed(0)
    m = tiny(attention=attention, n_kv_heads=2).double()
    prompt = torch.randint(0, 61, (2, 9))
    with_cache = m.generate(prompt, 20, temperature=0, use_cache=True)
    without = m.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(with_cache, without)
    # the cached step's logits equal the full pass's at every position
    ids = with_cache
    cache = m.new_cache()
    stepped = [m(ids[:, :9], cache=cache)]
    stepped += [m(ids[:, i:i + 1], start_pos=i, cache=cache) for i in range(9, ids.shape[1])]
    torch.testing.assert_close(torch.cat(stepped, 1), m(ids), atol=1e-9, rtol=1e-9)


def _favor_error(m, orthogonal, seed, q, k, v, exact):
    core = build_core("performer", causal=False, nb_features=m, orthogonal=orthogonal, seed=seed).double().eval()
    return ((core(q, k, v) - exact).norm() / exact.norm()).item()


def test_favor_error_falls_with_more_features():
    q, k, v = (t * 0.5 for t in qkv(b=1, h=4, n=128, d=16, **F64))
    exact = torch.softmax(q @ k.transpose(-1, -2) / 4.0, -1) @ v
    err = {m: sum(_favor_error(m, True, s, q, k, v, exact) for s in range(4)) / 4 for m in (16, 64, 256)}
    assert err[256] < err[64] < err[16]
    assert err[256] < 0.6 * err[16]  # Monte Carlo: ~1/sqrt(m), i.e. 4x less; 0.6 leaves room for seeds


def test_orthogonal_features_beat_iid_on_average():
    """Choromanski et al. 2021, Theorem 2: orthogonal random features estimate the softmax kernel
    exp(q.k / sqrt(d)) with a lower mean squared error than iid ones. The error of exp() features is
    heavy-tailed (one unlucky draw can dominate a mean of dozens), so the average over draws is the median;
    over 120 draws the ratio is ~0.77 (groups of 40 gave 0.66 to 0.92); 0.9 leaves that room."""
    import statistics

    g = torch.Generator().manual_seed(0)
    d, m = 16, 16  # one block of d orthogonal rows: where orthogonality matters most
    q, k = (torch.randn(64, d, generator=g, dtype=torch.float64) * 0.4 for _ in range(2))
    exact = torch.exp(q @ k.T / d ** 0.5)

    def mse(orthogonal, seed):
        w = la.random_projection(m, d, orthogonal=orthogonal, seed=seed).double()
        phi_q, phi_k = (torch.exp(la.favor_logits(x, w)) / m ** 0.5 for x in (q, k))
        return (((phi_q @ phi_k.T - exact) / exact) ** 2).mean().item()

    seeds = range(120)
    ortho = statistics.median(mse(True, s) for s in seeds)
    iid = statistics.median(mse(False, s) for s in seeds)
    assert ortho < 0.9 * iid, (ortho, iid)


def test_redraw_changes_features_only_in_training():
    core = build_core("performer", causal=False, nb_features=16, redraw_interval=2, seed=5)
    q, k, v = qkv(n=10, d=8)
    core.eval()
    core(q, k, v)
    first = core.projection.clone()
    for _ in range(5):
        core(q, k, v)
    assert torch.equal(core.projection, first), "features must stay fixed at eval"
    core.train()
    seen = []
    for _ in range(6):
        core(q, k, v)
        seen.append(core.projection.clone())
    # calls 0, 1 use draw 0; calls 2, 3 draw 1; calls 4, 5 draw 2
    assert torch.equal(seen[0], first) and torch.equal(seen[1], first)
    assert not torch.equal(seen[2], first) and torch.equal(seen[2], seen[3]) and not torch.equal(seen[4], seen[2])
    # the same seed gives the same draws (every rank of a data-parallel run agrees)
    twin = build_core("performer", causal=False, nb_features=16, redraw_interval=2, seed=5).train()
    for _ in range(6):
        twin(q, k, v)
    assert torch.equal(twin.projection, seen[-1])
    never = build_core("performer", causal=False, nb_features=16, redraw_interval=0, seed=5).train()
    for _ in range(5):
        never(q, k, v)
    assert torch.equal(never.projection, first)


@pytest.mark.parametrize("causal", [False, True])
def test_relu_kernel_without_projection_is_lras_performer(causal):
    """nb_features=None: phi(x) = relu(x) + 1e-3 on the unscaled head coordinates (LRA's generalized attention
    with deterministic features), the same in training (nothing to redraw) and at eval."""
    core = build_core("performer", causal=causal, kernel="relu", nb_features=None, redraw_interval=1).double()
    q, k, v = qkv(n=21, **F64)
    phi_q, phi_k = torch.relu(q) + 1e-3, torch.relu(k) + 1e-3
    a = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        a = a.tril()
    want = (a @ v) / a.sum(-1, keepdim=True)
    for mode in (core.train, core.eval, core.train):
        mode()
        torch.testing.assert_close(core(q, k, v), want, atol=1e-10, rtol=1e-10)
    assert core.projection is None and core.draws == 0


def test_redraw_skips_the_activation_checkpointing_recompute():
    m = zoo.build_model("gpt", n_layers=1, d_model=32, n_heads=2, max_seq_len=32, vocab_size=50,
                        attention={"core": "performer", "redraw_interval": 1, "nb_features": 8},
                        activation_checkpointing=True).train()
    core = m.trunk.blocks[0].attn.core
    m(torch.randint(0, 50, (2, 16))).sum().backward()
    assert core.calls == 1 and core.draws == 0  # the recompute in backward is not a new call


def test_projection_and_redraw_state_are_checkpointed(tmp_path):
    m = tiny(attention="performer")
    core = m.trunk.blocks[0].attn.core
    core.train()
    core.redraw()
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    fresh = tiny(attention="performer")
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fc = fresh.trunk.blocks[0].attn.core
    assert torch.equal(fc.projection, core.projection) and fc.draws == 1 and fc.base_seed == core.base_seed
    x = torch.randint(0, 61, (1, 12))
    torch.testing.assert_close(fresh(x), m.eval()(x))


@pytest.mark.parametrize("model,attention", [("gpt", "performer"), ("bert", "linear"), ("gpt", "linear"),
                                             ("bert", "performer"), ("performer", None), ("performer_lm", None)])
def test_models_take_the_cores(model, attention):
    kw = {"attention": attention} if attention else {}
    m = zoo.build_model(model, n_layers=2, d_model=32, n_heads=2, max_seq_len=40, vocab_size=70, **kw).train()
    x = torch.randint(0, 70, (2, 40))
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 30:] = 0
    out = m(x, attention_mask=mask)
    out.float().pow(2).mean().backward()
    assert out.shape == (2, 40, 70) and torch.isfinite(out).all()
    assert all(p.grad is not None for n, p in m.named_parameters() if "qkv" in n)
    core = m.trunk.blocks[0].attn.core
    assert core.name == (attention or "performer") and core.causal == (model in ("gpt", "performer_lm"))


def test_causal_model_with_linear_core_never_looks_ahead():
    for attention in ("performer", "linear"):
        m = tiny(attention=attention)
        x = torch.randint(0, 61, (2, 40))
        y = x.clone()
        y[:, 25:] = torch.randint(0, 61, (2, 15))
        torch.testing.assert_close(m(x)[:, :25], m(y)[:, :25])


@pytest.mark.parametrize("options,message", [
    ({"kernel": "x"}, "attention.kernel='x'; valid choices: softmax, relu"),
    ({"nb_features": 0}, "attention.nb_features"),
    ({"nb_features": None}, "attention.nb_features=null (no projection) needs attention.kernel='relu'"),
    ({"redraw_interval": -1}, "attention.redraw_interval"),
    ({"backend": "flash"}, "valid choices: auto, reference"),
    ({"chunk_size": 0}, "attention.chunk_size"),
    ({"recompute": "yes"}, "attention.recompute must be true or false"),
    ({"window": 3}, "do not fit core 'performer'"),
])
def test_bad_options_name_the_field(options, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        build_core("performer", causal=True, **options)


def test_attention_dropout_is_refused_not_ignored():
    with pytest.raises(ValueError, match="attn_dropout"):
        zoo.build_model("gpt", attention="linear", attn_dropout=0.1)


ENCODER_CORES = [("performer", {}), ("performer", {"kernel": "relu"}),
                 ("performer", {"kernel": "relu", "nb_features": None}), ("linear", {})]


def _grads(core, q, k, v, mask):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = core(q, k, v, key_padding_mask=mask)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("name,options", ENCODER_CORES)
@pytest.mark.parametrize("padded", [False, True])
def test_recomputed_bidirectional_equals_the_stored_path(name, options, padded):
    """attention.recompute=true: one autograd node that recomputes the features in backward gives the
    stored path's outputs and gradients, padded keys and a row with no valid key included, with GQA heads."""
    q, k, v = qkv(b=3, h=4, n=37, d=8, hk=2, **F64)
    mask = None
    if padded:
        mask = torch.ones(3, 37, dtype=torch.bool)
        mask[1, 30:] = False
        mask[2] = False  # no valid key: zeros and zero gradients, not nan
    if name == "performer":
        options = {"nb_features": 24, "seed": 7, **options}
    stored, recomputed = (build_core(name, causal=False, recompute=r, **options).double() for r in (False, True))
    want, got = _grads(stored, q, k, v, mask), _grads(recomputed, q, k, v, mask)
    for w, g in zip(want, got):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, atol=1e-11, rtol=1e-9)
    if padded:
        assert got[1][2].abs().max() == 0 and got[3][2].abs().max() == 0


def test_recomputed_bidirectional_under_bf16_autocast_is_as_accurate_as_the_stored_path():
    """bf16 inputs under autocast: both paths compute in float32 and round to bf16 at different points, so they
    are compared with the same model in float64; the recomputing path's error is no larger than the stored one's."""
    q, k, v = (t.bfloat16() for t in qkv(b=2, h=2, n=40, d=16))
    stored, recomputed, exact = (build_core("performer", causal=False, recompute=r, nb_features=32, seed=3)
                                 for r in (False, True, False))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = _grads(stored, q, k, v, None), _grads(recomputed, q, k, v, None)
    truth = _grads(exact.double(), q.double(), k.double(), v.double(), None)
    for w, g, t in zip(want, got, truth):
        assert g.dtype == w.dtype == torch.bfloat16
        err_w, err_g = ((x.double() - t).abs().max() / t.abs().max() for x in (w, g))
        assert err_g < 2e-2 and err_g <= 1.5 * err_w + 1e-3


def _saved_bytes(fn, *inputs):
    storages = {}  # a view (a transpose) shares its tensor's memory: count each storage once

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):  # the forward's; not the backward's transients
        out = fn(*leaves)
    out.float().sum().backward()
    return sum(storages.values())


def test_what_autograd_keeps_of_the_features():
    """Between forward and backward the stored path keeps the m-wide float32 features of every query and key and
    nothing else m-wide (the fused feature nodes keep phi, not the logits and exp's input as plain autograd does);
    the recomputing path keeps only q, k, v, the output and the (m, d_v) state."""
    q, k, v = qkv(b=1, h=2, n=256, d=16)
    stored, recomputed = (build_core("performer", causal=False, recompute=r, nb_features=128, seed=1)
                          for r in (False, True))
    kept, lean = _saved_bytes(stored, q, k, v), _saved_bytes(recomputed, q, k, v)
    n_by_m = 2 * 256 * 128 * 4  # one float32 feature tensor of the 2 heads
    assert 2 * n_by_m < kept < 3 * n_by_m  # phi_q, phi_k and n x d tensors
    assert lean < n_by_m


def test_the_bidirectional_node_keeps_bf16_features_without_float32_copies():
    phi_q, phi_k = (torch.rand(1, 2, 256, 128, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(1, 2, 256, 16, dtype=torch.bfloat16)
    n_by_m = 2 * 256 * 128  # elements of one feature tensor
    plain = _saved_bytes(lambda *a: la.linear_attention(*a, causal=False)[0], phi_q, phi_k, v)
    node = _saved_bytes(la.bidirectional_linear_attention, phi_q, phi_k, v)
    assert node < 1.5 * (2 * n_by_m * 2)  # the two bf16 features (which the feature kernels keep anyway), n x d tensors
    assert plain > 2 * n_by_m * 4  # plain autograd keeps float32 copies of both: twice the bytes


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded,offset", [(False, False), (True, False), (True, True)])
def test_fused_favor_features_equal_plain_autograd(causal, padded, offset):
    """favor_features' torch path (nodes that keep x and phi, the stabilising max a constant in backward) against
    the same ops under plain autograd (which also differentiates the max), through attention, whose output does
    not depend on the max: equal outputs and gradients in float64."""
    q, k, v = qkv(b=2, h=3, n=40, d=16, **F64)
    proj = la.random_projection(48, 16, seed=4).double()
    mask = torch.ones(2, 40, dtype=torch.bool)
    mask[1, 33:] = False
    mask = mask if padded else None
    prev = torch.full((2, 3, 1, 1), 0.5, dtype=torch.float64) if offset else None  # a decoder's running offset
    w = torch.randn(2, 3, 40, 16, **F64)
    results = []
    for fn in (la.favor_features_reference, lambda *a: la.favor_features(*a, impl="chunked")):
        qg, kg = q.clone().requires_grad_(), k.clone().requires_grad_()
        phi_q, phi_k, new = fn(qg, kg, proj, mask, prev)
        out = la.linear_attention(phi_q, phi_k, v, causal=causal, chunk_size=16)[0]
        (out * w).sum().backward()
        results.append((phi_q.detach(), phi_k.detach(), new, out.detach(), qg.grad, kg.grad))
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)
    if padded:
        assert results[1][1][1, :, 33:].abs().max() == 0 and results[1][5][1, :, 33:].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_bidirectional_node_equals_plain_autograd(dtype):
    """The stored node (the bidirectional path of both cores) against plain autograd over the same ops and the
    quadratic reference, with padded keys and a query row whose keys are all padded; bf16 features (as the Triton
    feature kernels give) keep their dtype and their gradients come back in it."""
    q, k, v = qkv(b=2, h=3, n=30, d=8, **F64)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1] = False
    phi_q, phi_k = features("favor", q, k, mask)
    w = torch.randn(2, 3, 30, 8, **F64)
    results = []
    for fn in (lambda a, b, c: la.linear_attention(a, b, c, causal=False)[0], la.bidirectional_linear_attention,
               lambda a, b, c: la.linear_attention_reference(a, b, c, causal=False)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (phi_q, phi_k, v)]
        out = fn(*leaves)
        (out.double() * w).sum().backward()
        results.append([out.detach()] + [t.grad for t in leaves])
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-2, rtol=2e-2)
    for want, got, ref in zip(*results):
        assert got.dtype == dtype
        torch.testing.assert_close(got, want, **tol)
        if dtype == torch.float64:  # the quadratic form in bf16 rounds its matmuls: a reference in float64 only
            torch.testing.assert_close(got, ref, **tol)
    assert results[1][0][1].abs().max() == 0 and results[1][1][1].abs().max() == 0  # no valid key: zeros


def test_a_redraw_between_forward_and_backward_is_an_error():
    core = build_core("performer", causal=False, nb_features=16, seed=2, recompute=True)
    q, k, v = (t.requires_grad_() for t in qkv(b=1, h=1, n=8, d=8))
    out = core(q, k, v)
    core.redraw()
    with pytest.raises(RuntimeError, match="redrawn between a forward and its backward"):
        out.sum().backward()
