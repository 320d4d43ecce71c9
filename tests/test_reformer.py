"""Reformer: LSH attention (chunked path == dense reference, degenerate cases, hashing), the reversible stack
(gradients == the plain stack in fp64, activation memory flat in depth), chunked FFN, axial positions, the
models (model=reformer, attention=lsh on other models) and debug=smoke."""
import pytest
import torch

import zoo
import zoo.models.transformer as transformer
from kernels.lsh_attention import (
    lsh_attention,
    lsh_attention_reference,
    random_rotations,
    shared_qk_attention_reference,
)
from zoo.blocks import build_core
from scripts.bench_reformer import saved_activation_bytes
from zoo.models.reformer import AxialPositions, plain_stack


def qv(n, b=2, h=3, d=8, dtype=torch.float64, grad=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, dtype=dtype, generator=g).requires_grad_(grad) for _ in range(2)]


def padding(b, n, cut=5):
    m = torch.ones(b, n, dtype=torch.bool)
    m[-1, n - cut:] = False
    return m


def on_real(x, mask):
    return x.masked_fill(~mask[:, None, :, None], 0.0)


# ------------------------------------------------------------------------------------------------ the kernel

@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,chunk,n_buckets,n_hashes", [(64, 16, 4, 1), (70, 16, 4, 2), (37, 8, 8, 3)])
def test_chunked_lsh_equals_dense_reference(causal, n, chunk, n_buckets, n_hashes):
    q, v = qv(n)
    mask = padding(2, n)
    rot = random_rotations(3, 8, n_hashes, n_buckets, seed=1).double()
    got = lsh_attention(q, v, rot, chunk, causal, mask)
    want = lsh_attention_reference(q, v, rot, chunk, causal, mask)
    torch.testing.assert_close(on_real(got, mask), on_real(want, mask), atol=1e-10, rtol=1e-10)


def test_chunked_lsh_gradients_equal_reference():
    q, v = qv(45, grad=True)
    rot = random_rotations(3, 8, 2, 4, seed=2).double()
    mask = padding(2, 45)
    go = torch.randn(2, 3, 45, 8, dtype=torch.float64)
    gq = torch.autograd.grad(on_real(lsh_attention(q, v, rot, 8, True, mask), mask).mul(go).sum(), [q, v])
    gr = torch.autograd.grad(on_real(lsh_attention_reference(q, v, rot, 8, True, mask), mask).mul(go).sum(), [q, v])
    for a, b in zip(gq, gr):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("n,chunk,n_buckets,n_hashes", [(32, 32, 2, 1), (27, 32, 8, 4), (40, 64, 16, 2)])
def test_one_chunk_equals_full_shared_qk_attention(causal, n, chunk, n_buckets, n_hashes):
    """All tokens in one chunk: whatever the buckets, every token sees every other: full shared-QK attention
    with the self-mask rule."""
    q, v = qv(n, seed=3)
    mask = padding(2, n, cut=4)
    rot = random_rotations(3, 8, n_hashes, n_buckets, seed=0).double()
    got = lsh_attention(q, v, rot, chunk, causal, mask)
    torch.testing.assert_close(on_real(got, mask), on_real(shared_qk_attention_reference(q, v, causal, mask), mask),
                               atol=1e-9, rtol=1e-9)


def test_a_token_attends_to_itself_only_when_nothing_else_is_there():
    q, v = qv(16)
    q = q * 5  # make self-similarity dominate if it were allowed
    rot = random_rotations(3, 8, 1, 2, seed=0).double()
    out = lsh_attention(q, v, rot, 16, True, None)
    torch.testing.assert_close(out[:, :, 0], v[:, :, 0])  # the first token has only itself
    torch.testing.assert_close(out[:, :, 1], v[:, :, 0])  # the second sees the first, not itself
    bidir = lsh_attention(q, v, rot, 16, False, None)
    ref = shared_qk_attention_reference(q, v, False)
    torch.testing.assert_close(bidir, ref)
    # with self allowed the output would lean towards the token's own value: check that it does not
    scores = torch.einsum("bhqd,bhkd->bhqk", q, q / q.norm(dim=-1, keepdim=True))
    with_self = torch.softmax(scores, -1) @ v
    assert (bidir - with_self).abs().max() > 1e-3


def test_more_hashes_bring_lsh_closer_to_full_attention():
    n, chunk = 256, 16
    errs = {}
    for r in (1, 2, 4, 8):
        total = 0.0
        for seed in range(3):
            q, v = qv(n, b=1, h=4, d=16, seed=seed)
            rot = random_rotations(4, 16, r, 16, seed=10 + seed).double()
            full = shared_qk_attention_reference(q * 2, v, False)
            total += (lsh_attention(q * 2, v, rot, chunk, False) - full).pow(2).mean().item()
        errs[r] = total / 3
    assert errs[8] < errs[4] < errs[2] < errs[1], errs


def test_hashing_is_seeded_per_layer_and_reproducible():
    a, b = build_core("lsh", causal=True, seed=5), build_core("lsh", causal=True, seed=5)
    b.layer_idx = a.layer_idx = 3
    torch.testing.assert_close(a.rotations(128, 2, 8, "cpu"), b.rotations(128, 2, 8, "cpu"))
    b.layer_idx, b._rotations = 4, {}
    assert not torch.equal(a.rotations(128, 2, 8, "cpu"), b.rotations(128, 2, 8, "cpu"))
    same = build_core("lsh", causal=True, seed=5, seed_per_layer=False, n_buckets=4)
    same.layer_idx = 7
    torch.manual_seed(5)  # HF's hash_seed: the global generator reseeded before the draw
    torch.testing.assert_close(same.rotations(128, 2, 8, "cpu"), torch.randn(2, 8, 2, 2))
    before = torch.get_rng_state()
    build_core("lsh", causal=True, seed=9).rotations(64, 2, 8, "cpu")
    assert torch.equal(before, torch.get_rng_state())  # hashing never moves the global RNG


def test_core_forward_equals_reference_and_eval_hashes():
    core = build_core("lsh", causal=True, chunk_length=8, n_buckets=4, n_hashes=2).eval()
    q, v = qv(40)
    torch.testing.assert_close(core(q, q, v), core.reference(q, q, v), atol=1e-10, rtol=1e-10)
    two = core(q, q, v)
    core.eval_n_hashes = 4
    assert not torch.allclose(core(q, q, v), two)  # evaluated with 4 rounds, trained with 2
    core.train()
    torch.testing.assert_close(core(q, q, v), two)  # training keeps its own n_hashes


@pytest.mark.parametrize("opts,msg", [
    ({"n_buckets": 3}, "n_buckets=3 must be even"), ({"n_hashes": 0}, "n_hashes=0"),
    ({"chunk_length": 0}, "chunk_length=0"), ({"impl": "fast"}, "valid choices: auto, chunked, reference")])
def test_bad_options_name_the_field(opts, msg):
    with pytest.raises(ValueError, match=msg):
        build_core("lsh", causal=True, **opts)


def test_lsh_needs_shared_qk_and_attaches_to_other_models():
    with pytest.raises(ValueError, match="needs model.shared_qk=true"):
        zoo.build_model("gpt", vocab_size=97, d_model=32, n_heads=4, attention="lsh")
    for name in ("gpt", "bert"):
        m = zoo.build_model(name, vocab_size=97, d_model=32, n_layers=2, n_heads=4, max_seq_len=64, shared_qk=True,
                            attention={"core": "lsh", "chunk_length": 8})
        assert type(m.trunk.blocks[0].attn.core).name == "lsh"
        assert m(torch.randint(0, 97, (2, 50))).shape == (2, 50, 97)


# ------------------------------------------------------------------------------------------------ reversible

def tiny_reformer(**kw):
    opts = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, max_seq_len=64,
                attention={"core": "lsh", "chunk_length": 8, "n_buckets": 4, "n_hashes": 2})
    opts.update(kw)
    return zoo.build_model("reformer", **opts)


def grads_of(model, x):
    model.zero_grad()
    emb_out = {}

    def keep(module, inputs, out):  # the embeddings' gradient: what flows out of the stack's bottom
        out.retain_grad()
        emb_out["e"] = out

    h = model.trunk.tok_emb.register_forward_hook(keep)
    loss = model(x).pow(2).mean()
    loss.backward()
    h.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, emb_out["e"].grad


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_reversible_gradients_equal_the_plain_stack(monkeypatch, dropout):
    torch.manual_seed(0)
    model = tiny_reformer(dropout=dropout, attn_dropout=dropout, ffn_chunks=3).double().train()
    x = torch.randint(0, 61, (2, 37))
    torch.manual_seed(1)
    loss_r, g_r, e_r = grads_of(model, x)
    monkeypatch.setattr(transformer, "reversible_stack", plain_stack)
    torch.manual_seed(1)  # the same dropout masks: the reversible backward replays the forward's RNG
    loss_p, g_p, e_p = grads_of(model, x)
    torch.testing.assert_close(loss_r, loss_p, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(e_r, e_p, atol=1e-10, rtol=1e-8)
    assert set(g_r) == set(g_p)
    for n in g_r:
        torch.testing.assert_close(g_r[n], g_p[n], atol=1e-10, rtol=1e-8, msg=n)


def test_reversible_activation_memory_stays_flat_with_depth():
    x = torch.randint(0, 61, (2, 64))
    rev = [saved_activation_bytes(tiny_reformer(n_layers=n).train(), x) for n in (2, 4, 8)]
    plain = [saved_activation_bytes(tiny_reformer(n_layers=n, reversible=False, tie_embeddings=True).train(), x)
             for n in (2, 4, 8)]
    assert max(rev) <= 1.1 * min(rev), rev
    assert plain[2] > 3 * plain[0], plain  # the plain stack keeps every layer's activations


def test_chunked_ffn_equals_unchunked_and_reversible_inference_equals_training_path():
    torch.manual_seed(0)
    a = tiny_reformer(ffn_chunks=1).double().eval()
    b = tiny_reformer(ffn_chunks=5).double().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 61, (2, 45))
    with torch.no_grad():
        want = a(x)
    torch.testing.assert_close(b(x), want)  # grad enabled: through the autograd function
    with torch.no_grad():
        torch.testing.assert_close(b(x), want)


def test_axial_positions():
    ax = AxialPositions((4, 8), (12, 20))
    pos = torch.arange(32)
    table = ax(pos)
    assert table.shape == (32, 32) and sum(p.numel() for p in ax.parameters()) == 4 * 12 + 8 * 20
    torch.testing.assert_close(table[11], torch.cat([ax.weights[0][1, 0], ax.weights[1][0, 3]]))
    m = tiny_reformer(axial_shape=[8, 8], axial_dims=[8, 24])
    assert isinstance(m.trunk.pos_emb, AxialPositions) and m(torch.randint(0, 61, (1, 40))).shape == (1, 40, 61)
    for kw, msg in (({"axial_shape": [4, 8], "axial_dims": [8, 24]}, "fewer than model.max_seq_len=64"),
                    ({"axial_shape": [8, 8], "axial_dims": [8, 8]}, "must sum to model.d_model=32"),
                    ({"axial_shape": [8, 8]}, "go together")):
        with pytest.raises(ValueError, match=msg):
            tiny_reformer(**kw)


def test_reformer_config_errors():
    with pytest.raises(ValueError, match="tie_embeddings=false"):
        tiny_reformer(tie_embeddings=True)
    with pytest.raises(ValueError, match="norm_position=pre"):
        tiny_reformer(norm_position="post")
    with pytest.raises(ValueError, match="ffn_chunks"):
        tiny_reformer(ffn_chunks=0)
    with pytest.raises(ValueError, match="ffn=moe"):
        tiny_reformer(ffn="moe")


def test_reformer_generates_without_a_cache_and_the_encoder_classifies():
    m = tiny_reformer().eval()
    out = m.generate(torch.tensor([[1, 2, 3]]), 5, temperature=0)
    assert out.shape == (1, 8)
    enc = zoo.build_model("reformer_encoder", vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=64,
                          num_labels=3, attention={"core": "lsh", "chunk_length": 8})
    assert enc(torch.randint(0, 61, (2, 30))).shape == (2, 30, 61)
    assert enc.classify(torch.randint(0, 61, (2, 30))).shape == (2, 3)


def test_debug_smoke_trains_model_reformer(tmp_path):
    import train
    from helpers import make_cfg
    cfg = make_cfg(tmp_path, "model=reformer", "model.attention.chunk_length=16", "logger=csv",
                   "trainer.max_steps=6", "trainer.val_check_interval=3", "sample.max_new_tokens=4")
    metrics = train.train(cfg)
    assert all(torch.isfinite(torch.tensor(v)) for k, v in metrics.items() if "loss" in k)
    model, mcfg = zoo.load_checkpoint(next(tmp_path.rglob("last.ckpt")))
    assert mcfg.reversible and mcfg.attention["core"] == "lsh" and model.cfg.attention["chunk_length"] == 16


# ------------------------------------------------------------------------------------------------ duplication

def test_duplication_data_is_0w0w_scored_on_the_second_copy():
    from data.duplication import DuplicationDataModule, generate_duplication
    x, y = generate_duplication(5, vocab_size=10, seq_len=12, seed=3)
    assert x.shape == y.shape == (5, 12)
    w = x[:, 1:6]
    assert (x[:, 0] == 0).all() and (x[:, 6] == 0).all() and torch.equal(x[:, 7:], w) and (w > 0).all()
    assert (y[:, :6] == -100).all() and torch.equal(y[:, 6:11], w) and (y[:, 11] == -100).all()
    assert torch.equal(generate_duplication(5, vocab_size=10, seq_len=12, seed=3)[0], x)
    assert not torch.equal(generate_duplication(5, vocab_size=10, seq_len=12, seed=3, split="val")[0], x)
    with pytest.raises(ValueError, match="data.seq_len=11 must be even"):
        DuplicationDataModule(vocab_size=10, seq_len=11)


def test_tiny_duplication_more_evaluation_hashes_do_not_hurt():
    """The paper's table 2 in miniature (length 32, chunks of 8): trained with LSH-1 and with full attention,
    evaluated with full and LSH-1/2/4/8."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "scripts"))
    from data.duplication import generate_duplication
    from reformer_copy import accuracy_matrix

    x, y = generate_duplication(150 * 32, vocab_size=16, seq_len=32, seed=0)
    models = {}
    for arm, chunk, hashes in (("lsh1", 8, 1), ("full", 32, 1)):
        torch.manual_seed(0)
        m = zoo.build_model("reformer", vocab_size=16, d_model=64, n_layers=1, n_heads=2, d_ff=128, max_seq_len=32,
                            ffn_chunks=1, attention={"core": "lsh", "chunk_length": chunk, "n_hashes": hashes})
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        for s in range(150):
            xb, yb = x[s * 32:(s + 1) * 32], y[s * 32:(s + 1) * 32]
            loss = torch.nn.functional.cross_entropy(m(xb).flatten(0, 1), yb.flatten(), ignore_index=-100)
            opt.zero_grad()
            loss.backward()
            opt.step()
        models[arm] = m
    xv, yv = generate_duplication(256, vocab_size=16, seq_len=32, seed=0, split="val")
    acc = accuracy_matrix(models, xv, yv, lsh_chunk=8)
    assert acc["lsh1"]["lsh1"] > 80 and acc["full"]["full"] > 80, acc  # both learned the task
    for arm in acc:
        a = acc[arm]
        assert a["lsh8"] + a["lsh4"] >= a["lsh2"] + a["lsh1"] - 1.0, acc
        assert a["lsh8"] >= a["lsh1"] - 1.0, acc
    assert models["lsh1"].trunk.blocks[0].attn.core.chunk_length == 8  # the evaluation put it back


def test_reformer_copy_refuses_two_runs_of_one_arm(tmp_path):
    """A rerun left beside an earlier run of the same arm: the table must not pick one of them silently."""
    import sys
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "scripts"))
    import reformer_copy
    from helpers import lightning_like_checkpoint

    m = zoo.build_model("reformer", vocab_size=16, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_seq_len=32,
                        attention={"core": "lsh", "chunk_length": 8, "n_hashes": 2})
    for run in ("lsh2", "lsh2,trainer.max_steps=1000"):
        (tmp_path / run / "checkpoints").mkdir(parents=True)
        lightning_like_checkpoint(tmp_path / run / "checkpoints" / "last.ckpt", m)
    with pytest.raises(ValueError, match="two checkpoints of the 'lsh2' arm"):
        reformer_copy.main([str(tmp_path), "device=cpu", "n_eval=4"])
