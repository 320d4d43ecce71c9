"""Sparse cores (sliding window, Longformer, BigBird, Sparse Transformer): fast path == dense masked reference,
degenerate cases == their parents, the decoding cache, and the models built on them."""
import pytest
import torch

import zoo
from kernels.sparse_attention import dense_masked_attention, merge_partials
from kernels.sparse_patterns import bigbird_block_table
from zoo.blocks import build_core

CASES = [
    ("sliding_window", {"window": 8}, True),
    ("sliding_window", {"window": 8}, False),
    ("sliding_window", {"window": 5, "dilation": 3}, True),
    ("sliding_window", {"window": 6, "dilation": 2}, False),
    ("sliding_window", {"window": 40}, True),
    ("bigbird", {"block_size": 4, "num_random_blocks": 2}, False),
    ("bigbird", {"block_size": 8, "num_random_blocks": 1, "num_global_blocks": 2}, False),
    ("sparse_strided", {"stride": 5}, True),
    ("sparse_strided", {"stride": 6, "pattern": "fixed", "summary": 2}, True),
    ("longformer", {"window": 6}, False),
    ("sparse_strided", {"stride": 5}, False),
    ("sparse_strided", {"stride": 6, "pattern": "fixed", "summary": 2}, False),
]


def qkv(n, b=2, h=4, hkv=2, d=8, dtype=torch.float32, grad=False):
    return [torch.randn(b, hh, n, d, dtype=dtype, requires_grad=grad) for hh in (h, hkv, hkv)]


def padding(b, n, cut=5):
    m = torch.ones(b, n, dtype=torch.bool)
    m[-1, n - cut:] = False
    return m


@pytest.mark.parametrize("name,opts,causal", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("n", [7, 37, 96, 131])
def test_fast_path_equals_dense_reference(name, opts, causal, n):
    torch.manual_seed(n)
    core = build_core(name, causal=causal, **opts).eval()
    q, k, v = qkv(n)
    for mask in (None, padding(2, n)):
        fast, ref = core(q, k, v, key_padding_mask=mask), core.reference(q, k, v, key_padding_mask=mask)
        if mask is not None:  # padded query rows are never read; real rows must match exactly
            fast, ref = fast * mask[:, None, :, None], ref * mask[:, None, :, None]
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,opts,causal", CASES[::2], ids=[c[0] for c in CASES[::2]])
def test_fast_path_gradients_equal_reference(name, opts, causal):
    torch.manual_seed(0)
    core = build_core(name, causal=causal, **opts).eval()
    inputs = qkv(45, dtype=torch.float64)
    weight = torch.randn(2, 4, 45, 8, dtype=torch.float64)
    grads = []
    for fn in (core, core.reference):
        q, k, v = (t.clone().requires_grad_() for t in inputs)
        (fn(q, k, v) * weight).sum().backward()
        grads.append([t.grad for t in (q, k, v)])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


def longformer_inputs(n, b=2, h=4, d=8):
    torch.manual_seed(n)
    q, k, v = qkv(n, b, h, h, d)
    g = [torch.randn(b, h, n, d) for _ in range(3)]
    gm = torch.zeros(b, n, dtype=torch.bool)
    gm[0, 0] = True
    gm[0, n // 2] = True
    gm[1, [1, 3, n - 1]] = True
    return q, k, v, g, gm


@pytest.mark.parametrize("n", [9, 40, 100])
@pytest.mark.parametrize("pad", [False, True])
def test_longformer_global_tokens_fast_equals_reference(n, pad):
    from kernels.sparse_patterns import longformer_attention
    q, k, v, g, gm = longformer_inputs(n)
    mask = padding(2, n, cut=4) if pad else None
    if pad:
        gm[1, n - 1] = False  # a padded token is never global
    fast = longformer_attention(q, k, v, 8, gm, g, mask, impl="blocked")
    ref = longformer_attention(q, k, v, 8, gm, g, mask, impl="reference")
    if pad:
        fast, ref = fast * mask[:, None, :, None], ref * mask[:, None, :, None]
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def test_longformer_global_rows_see_everything_and_everyone_sees_them():
    from kernels.sparse_patterns import longformer_attention
    q, k, v, g, gm = longformer_inputs(64)
    out = longformer_attention(q, k, v, 4, gm, g, impl="blocked")
    v2 = v.clone()
    v2[0, :, 40] += 1.0  # far outside token 0's window: only global attention can carry it
    out2 = longformer_attention(q, k, v2, 4, gm, g, impl="blocked")
    assert torch.allclose(out[0, :, 0], out2[0, :, 0])  # global rows use their own values (g), not v
    g2 = [t.clone() for t in g]
    g2[2][0, :, 40] += 1.0
    assert not torch.allclose(out[0, :, 0], longformer_attention(q, k, v, 4, gm, g2, impl="blocked")[0, :, 0])
    v3 = v.clone()
    v3[0, :, 32] += 1.0  # token 32 is global in example 0: token 5 (window 2 each side) must see it
    assert not torch.allclose(out[0, :, 5], longformer_attention(q, k, v3, 4, gm, g, impl="blocked")[0, :, 5])


# ---------------------------------------------------------------------------------------- degenerate cases

@pytest.mark.parametrize("causal", [True, False])
def test_window_covering_the_sequence_equals_full_attention(causal):
    q, k, v = qkv(30)
    window = 64 if not causal else 30
    core = build_core("sliding_window", causal=causal, window=window)
    parent = build_core("causal" if causal else "full", causal=causal)
    mask = padding(2, 30)
    torch.testing.assert_close(core(q, k, v, key_padding_mask=mask) * mask[:, None, :, None],
                               parent(q, k, v, key_padding_mask=mask) * mask[:, None, :, None], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", ["strided", "fixed"])
def test_encoder_sparse_strided_with_a_stride_covering_the_sequence_equals_full_attention(pattern):
    q, k, v = qkv(30)
    core = build_core("sparse_strided", causal=False, stride=32, pattern=pattern)
    mask = padding(2, 30)
    full = build_core("full", causal=False)
    torch.testing.assert_close(core(q, k, v, key_padding_mask=mask) * mask[:, None, :, None],
                               full(q, k, v, key_padding_mask=mask) * mask[:, None, :, None], atol=1e-5, rtol=1e-5)


def test_encoder_sparse_strided_pattern_is_the_mirror_of_the_causal_one():
    from kernels.sparse_patterns import strided_predicate
    pos = torch.arange(40)
    for pattern in ("strided", "fixed"):
        causal = strided_predicate(8, pattern, 2, True)(pos[:, None], pos[None, :])
        both = strided_predicate(8, pattern, 2, False)(pos[:, None], pos[None, :])
        assert torch.equal(both.tril(), causal)  # the causal half is the paper's pattern
    both = strided_predicate(8, "strided", 1, False)(pos[:, None], pos[None, :])
    assert torch.equal(both, both.T)  # strided: symmetric, every stride-th token either way
    assert both[20].nonzero().flatten().tolist() == [4] + list(range(12, 29)) + [36]


def test_longformer_without_global_tokens_equals_sliding_window():
    q, k, v = qkv(50, hkv=4)
    lf = build_core("longformer", causal=False, window=10)
    sw = build_core("sliding_window", causal=False, window=10)
    torch.testing.assert_close(lf(q, k, v, context={}), sw(q, k, v))
    no_globals = {"global_attention_mask": torch.zeros(2, 50, dtype=torch.bool)}
    torch.testing.assert_close(lf(q, k, v, context=no_globals), sw(q, k, v))


def test_bigbird_without_random_or_global_blocks_is_block_local():
    q, k, v = qkv(40)
    bb = build_core("bigbird", causal=False, block_size=8, num_random_blocks=0, num_global_blocks=0)
    blocks = torch.arange(40) // 8
    local = (blocks[:, None] - blocks[None, :]).abs() <= 1
    torch.testing.assert_close(bb(q, k, v), dense_masked_attention(q, k, v, local[None, None]), atol=1e-5, rtol=1e-5)


def test_bigbird_layout_is_seeded_per_layer_and_reproducible():
    def table(seed, layer):
        core = build_core("bigbird", causal=False, block_size=4, num_random_blocks=2, seed=seed)
        core.layer_idx = layer
        return core.table(16, 4)
    assert torch.equal(table(0, 0), table(0, 0))
    assert not torch.equal(table(0, 0), table(0, 1))
    assert not torch.equal(table(0, 0), table(1, 0))
    t = table(0, 0)
    assert t[:, 0].all() and t[:, :, 0].all()  # global blocks: their row and column are full
    # middle rows: 3 window + 2 global + 2 random blocks, no duplicates
    assert (t[:, 2:-2].sum(-1) == 7).all()


def test_bigbird_fixed_random_blocks_are_used():
    fixed = torch.full((1, 8, 1), -1)
    fixed[0, 4, 0] = 7 - 6  # block 4 also sees block 1
    t = bigbird_block_table(8, 1, 1, 1, torch.Generator().manual_seed(0), fixed)
    assert t[0, 4].nonzero().flatten().tolist() == [0, 1, 3, 4, 5, 7]


def test_merge_of_disjoint_partials_is_the_softmax_of_the_union():
    q, k, v = qkv(12, hkv=4)
    left = torch.zeros(12, 12, dtype=torch.bool)
    left[:, :5] = True
    o1, l1 = dense_masked_attention(q, k, v, left, return_lse=True)
    o2, l2 = dense_masked_attention(q, k, v, ~left, return_lse=True)
    merged, _ = merge_partials(o1, l1, o2, l2)
    torch.testing.assert_close(merged, dense_masked_attention(q, k, v, torch.ones(12, 12, dtype=torch.bool)))


# ---------------------------------------------------------------------------------------- decoding

@pytest.mark.parametrize("attention", [{"core": "sliding_window", "window": 6},
                                       {"core": "sliding_window", "window": 4, "dilation": 2},
                                       {"core": "sparse_strided", "stride": 4},
                                       {"core": "sparse_strided", "stride": 4, "pattern": "fixed", "summary": 2}])
def test_cached_decoding_equals_the_full_pass(attention):
    torch.manual_seed(0)
    m = zoo.build_model("gpt", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                        position="rope", attention=attention).eval()
    x = torch.randint(0, 97, (2, 30))
    full = m(x)
    cache = m.new_cache()
    steps = [m(x[:, :9], cache=cache)] + [m(x[:, i:i + 1], start_pos=i, cache=cache) for i in range(9, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    if attention["core"] == "sliding_window":  # the rolling buffer: bounded, and GQA keeps 2 heads
        keep = (attention["window"] - 1) * attention.get("dilation", 1)
        assert cache[0]["k"].shape == (2, 2, keep, 8)
    prompt = x[:, :5]
    torch.testing.assert_close(m.generate(prompt, 20, temperature=0), m.generate(prompt, 20, temperature=0,
                                                                                    use_cache=False))


# ---------------------------------------------------------------------------------------- models and errors

def test_named_models_build_train_and_classify_with_a_global_first_token():
    for name in ("longformer", "bigbird"):
        m = zoo.build_model(name, vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=128, num_labels=3)
        x = torch.randint(0, 97, (2, 70))
        loss = m(x).logsumexp(-1).mean() + m.classify(x, attention_mask=padding(2, 70)).sum()
        loss.backward()
        assert all(p.grad is not None for n, p in m.named_parameters() if "global_qkv" not in n and "lm_head" not in n)
    lf = zoo.build_model("longformer", vocab_size=97, d_model=32, n_layers=1, n_heads=4, max_seq_len=128,
                         num_labels=2).eval()
    x = torch.randint(0, 97, (1, 100))
    y = x.clone()
    y[0, 90] = (y[0, 90] + 1) % 97  # far outside token 0's window (window 256 would cover it: use 8)
    lf8 = zoo.build_model(lf.cfg, attention={"core": "longformer", "window": 8}).eval()
    assert not torch.allclose(lf8.classify(x), lf8.classify(y))  # the global first token sees token 90


def test_decoders_take_the_causal_sparse_cores_and_encoders_the_others():
    zoo.build_model("gpt", attention={"core": "sliding_window", "window": 16})
    zoo.build_model("gpt", attention="sparse_strided")
    zoo.build_model("bert", attention="bigbird")
    zoo.build_model("bert", attention="sparse_strided")  # the mirrored pattern
    with pytest.raises(ValueError, match="cores that would work: .*sliding_window"):
        zoo.build_model("gpt", attention="bigbird")


@pytest.mark.parametrize("attention,msg", [
    ({"core": "sliding_window", "window": 0}, "attention.window=0 must be an integer >= 1"),
    ({"core": "sparse_strided", "pattern": "zigzag"}, "attention.pattern='zigzag'; valid choices: strided, fixed"),
    ({"core": "sliding_window", "impl": "cuda"}, "attention.impl='cuda'; valid choices: auto, reference"),
    ({"core": "sliding_window", "windw": 4}, r"attention option\(s\) \['windw'\] are unknown"),
])
def test_bad_options_name_the_field_and_the_choices(attention, msg):
    with pytest.raises(ValueError, match=msg):
        zoo.build_model("gpt", attention=attention)


def test_switching_core_drops_the_other_cores_options():
    with pytest.warns(UserWarning, match=r"ignores the option\(s\) \['window'\]"):
        m = zoo.build_model("longformer", vocab_size=97, attention="full")
    assert m.cfg.attention == {"core": "full", "backend": "auto"}


def _flex_case(name, opts, causal, device, n=300):
    core = build_core(name, causal=causal, impl="flex", **opts).to(device)
    q, k, v = (t.to(device) for t in qkv(n, d=16))
    ctx = None
    if name == "longformer":
        core.setup(zoo.model_config("bert", d_model=64, n_heads=4))
        core.to(device)
        gm = torch.zeros(2, n, dtype=torch.bool, device=device)
        gm[:, 0] = True
        gm[0, n // 2] = True
        ctx = {"hidden": torch.randn(2, n, 64, device=device), "global_attention_mask": gm}
    return core, (q, k, v), ctx


# the flex tests add a Longformer window wide enough for full tiles (flex skips the mask_mod in those)
FLEX_CASES = CASES + [("longformer", {"window": 260}, False)]
FLEX_IDS = [f"{c[0]}-{i}" for i, c in enumerate(FLEX_CASES)]


@pytest.mark.parametrize("name,opts,causal", FLEX_CASES, ids=FLEX_IDS)
@pytest.mark.parametrize("n", [256, 300])  # 256: a multiple of flex's tile, nothing padded or sliced
def test_flex_path_forward_equals_reference(name, opts, causal, n, monkeypatch):
    """The CUDA path's logic (block masks, padding to flex's tile, LSE merges) checked on CPU with flex_attention
    run eagerly (forward only: flex has no CPU backward; the GPU test below checks gradients)."""
    import kernels.sparse_attention as sa
    import kernels.sparse_patterns as sp
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    monkeypatch.setattr(sa, "_flex", flex_attention)
    monkeypatch.setattr(sp, "make_block_mask", lambda mm, b, h, nq, nk, device: create_block_mask(mm, b, h, nq, nk,
                                                                                                  device=device))
    monkeypatch.setattr(sp, "_BLOCK_MASKS", {})
    core, (q, k, v), ctx = _flex_case(name, opts, causal, "cpu", n)
    for m in (None, padding(2, n)):
        fast, ref = core(q, k, v, key_padding_mask=m, context=ctx), core.reference(q, k, v, key_padding_mask=m,
                                                                                  context=ctx)
        if m is not None:
            fast, ref = fast * m[:, None, :, None], ref * m[:, None, :, None]
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)


def _tiles(num, idx, n_cols):
    """A BlockMask's (count, indices) per row -> (rows, n_cols) bool."""
    num, idx = num[0, 0], idx[0, 0]
    out = torch.zeros(len(num), n_cols, dtype=torch.bool)
    for r in range(len(num)):
        out[r, idx[r, : num[r]].long()] = True
    return out


@pytest.mark.parametrize("n,window,extra", [(256, 6, 1), (300, 260, 1), (700, 300, 2), (128, 600, 1), (1000, 2, 1)])
def test_longformer_tile_layout_is_exactly_the_band(n, window, extra):
    """The Longformer flex layout is tile arithmetic, not a scan of the (N, N) grid: it must list exactly the
    tiles the band touches (eager flex on CPU reads the mask everywhere, so only this test holds the layout),
    mark full only tiles the band fills, and scan the global-key slots from every row."""
    from torch.nn.attention.flex_attention import create_block_mask
    from kernels.sparse_patterns import FLEX_BLOCK, _window_tiles, window_predicate
    n_pad = -(-n // FLEX_BLOCK) * FLEX_BLOCK
    nb = n_pad // FLEX_BLOCK
    band = window_predicate(window, False)
    want = create_block_mask(lambda b, h, q, k: band(q, k) & (k < n), None, None, n_pad, n_pad, device="cpu")
    want_partial = _tiles(want.kv_num_blocks, want.kv_indices, nb)
    want_full = _tiles(want.full_kv_num_blocks, want.full_kv_indices, nb)
    for exact in (True, False):
        got = _window_tiles(n, n_pad, -(window // 2), window // 2, extra, exact, "cpu")
        assert got.seq_lengths == (n_pad, n_pad + extra * FLEX_BLOCK)
        partial = _tiles(got.kv_num_blocks, got.kv_indices, nb + extra)
        full = _tiles(got.full_kv_num_blocks, got.full_kv_indices, nb + extra)
        assert torch.equal((partial | full)[:, :nb], want_partial | want_full)
        assert torch.equal(full[:, :nb], want_full if exact else torch.zeros_like(want_full))
        assert partial[:, nb:].all() and not full[:, nb:].any()


@pytest.mark.gpu
@pytest.mark.parametrize("name,opts,causal", FLEX_CASES, ids=FLEX_IDS)
def test_flex_path_on_cuda_equals_reference_with_gradients(name, opts, causal):
    torch.manual_seed(0)
    core, inputs, ctx = _flex_case(name, opts, causal, "cuda")
    weight = torch.randn_like(inputs[0])
    params = list(core.parameters())  # Longformer's global projections: their gradients too
    for m in (None, padding(2, 300).cuda()):
        results = []
        for fn in (core, core.reference):
            q, k, v = (t.clone().requires_grad_() for t in inputs)
            for p in params:
                p.grad = None
            out = fn(q, k, v, key_padding_mask=m, context=ctx)
            if m is not None:
                out = out * m[:, None, :, None]
            (out * weight).sum().backward()
            results.append([out, q.grad, k.grad, v.grad] + [p.grad for p in params])
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=2e-3, rtol=2e-3)


def test_longformer_global_every_and_shared_projections():
    q, k, v = qkv(40, hkv=4)
    lf = build_core("longformer", causal=False, window=4, global_every=10, global_projections="shared")
    gm = (torch.arange(40) % 10 == 0).expand(2, 40)
    want = build_core("longformer", causal=False, window=4, global_projections="shared")(
        q, k, v, context={"global_attention_mask": gm})
    torch.testing.assert_close(lf(q, k, v, context={}), want)
    torch.testing.assert_close(lf(q, k, v), lf.reference(q, k, v), atol=1e-5, rtol=1e-5)
    sep = zoo.build_model("longformer", vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    shared = zoo.build_model(sep.cfg, attention={"core": "longformer", "window": 8, "global_projections": "shared"})
    assert sep.num_params() - shared.num_params() == 2 * (3 * 32 * 32 + 3 * 32)
    assert shared.num_params() == zoo.build_model(sep.cfg, attention="full").num_params()


@pytest.mark.parametrize("core,overrides", [
    ("longformer", ["model=longformer"]), ("bigbird", ["model=bigbird"]),
    ("sliding_window", ["model=gpt", "attention=sliding_window", "model.attention.window=16"]),
    ("sparse_strided", ["model=gpt", "attention=sparse_strided", "model.attention.stride=8"]),
    ("longformer", ["model=longformer", "task=classification"])])
def test_debug_smoke_trains_the_sparse_models(tmp_path, core, overrides):
    import train
    from helpers import make_cfg
    cfg = make_cfg(tmp_path, *overrides, "logger=csv", "trainer.max_steps=6", "trainer.val_check_interval=3")
    metrics = train.train(cfg)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if "loss" in k)
    ckpt = next(tmp_path.rglob("last.ckpt"))
    model, mcfg = zoo.load_checkpoint(ckpt)
    assert mcfg.attention["core"] == core and type(model.trunk.blocks[0].attn.core).name == core
