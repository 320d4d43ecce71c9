"""Sparse MoE FFN: degenerate cases, losses, dispatch paths, capacity; GQA/MQA; cached decoding; training."""
from __future__ import annotations

import csv
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import zoo
from helpers import ROOT, make_cfg, perturbed
from zoo.blocks.ffn import SwiGLU
from zoo.blocks.moe import MoE, combine_aux

sys.path.insert(0, str(ROOT / "scripts"))
import train as train_script  # noqa: E402

TINY = dict(vocab_size=97, max_seq_len=64, d_model=32, n_layers=2, n_heads=4, dropout=0.0)


def _aux(moe: MoE):
    return combine_aux([moe.stats], moe.n_experts)


def test_one_expert_model_equals_dense_swiglu_model():
    torch.manual_seed(0)
    dense = perturbed(zoo.build_model("gpt", **TINY, ffn="swiglu", d_ff=48, bias=False))
    moe = zoo.build_model("gpt", **TINY, ffn="moe", d_ff=48, bias=False, n_experts=1, moe_top_k=1).eval()
    state = dense.state_dict()
    for i in range(TINY["n_layers"]):
        f = f"trunk.blocks.{i}.ffn"
        state[f"{f}.w13"] = torch.cat([state.pop(f"{f}.w1.weight"), state.pop(f"{f}.w3.weight")])[None]
        state[f"{f}.w2"] = state.pop(f"{f}.w2.weight")[None]
        state[f"{f}.router.weight"] = torch.randn(1, TINY["d_model"])
    moe.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(moe(ids), dense(ids), atol=1e-5, rtol=1e-5)
    lb, z = moe.moe_losses()
    assert lb.item() == pytest.approx(1.0)  # one expert gets everything with probability 1: E * 1 * 1


def test_top_k_equal_to_e_with_equal_logits_is_the_mean_of_the_experts():
    torch.manual_seed(0)
    moe = MoE(16, 24, n_experts=4, top_k=4).eval()
    with torch.no_grad():
        moe.router.weight.zero_()
    x = torch.randn(2, 5, 16)
    experts = []
    for i in range(4):
        ffn = SwiGLU(16, 24)
        ffn.w1.weight.data, ffn.w3.weight.data = moe.w13[i].data.chunk(2)
        ffn.w2.weight.data = moe.w2[i].data
        experts.append(ffn(x))
    with torch.no_grad():
        torch.testing.assert_close(moe(x), torch.stack(experts).mean(0), atol=1e-5, rtol=1e-5)
    # all experts equally likely and equally used: perfectly balanced routing scores k
    assert _aux(moe)[0].item() == pytest.approx(4.0)


def _hand_routed(logits: torch.Tensor, top_k: int) -> MoE:
    """An MoE whose router gives exactly `logits` (tokens, E) for x = the identity (token t is one-hot e_t)."""
    t, e = logits.shape
    moe = MoE(t, 8, n_experts=e, top_k=top_k).eval()
    with torch.no_grad():
        moe.router.weight.copy_(logits.t())
    return moe


@pytest.mark.parametrize("top_k", [1, 2])
def test_balance_loss_equals_the_textbook_value_on_a_hand_built_routing(top_k):
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0],  # token 0 -> experts 0 (then 1)
                           [2.0, 0.5, 0.0, 0.0],  # token 1 -> 0 (then 1)
                           [0.0, 0.0, 4.0, 1.0],  # token 2 -> 2 (then 3)
                           [1.0, 2.0, 0.0, 0.0]])  # token 3 -> 1 (then 0)
    moe = _hand_routed(logits, top_k)
    with torch.no_grad():
        moe(torch.eye(4)[None])
    # Switch (Fedus et al. 2021, eq. 4-6): E * sum_i f_i * P_i; f_i = share of tokens dispatched to expert i
    # (with top-k, counting every slot, as HF's load_balancing_loss_func does), P_i = mean router probability
    f = torch.tensor([2, 1, 1, 0.0]) / 4 if top_k == 1 else torch.tensor([3, 3, 1, 1.0]) / 4
    p = logits.softmax(-1).mean(0)
    assert _aux(moe)[0].item() == pytest.approx(4 * (f * p).sum().item(), rel=1e-6)
    assert moe.expert_load().tolist() == pytest.approx((f / top_k).tolist())
    # ST-MoE's z-loss: mean squared log-partition of the router logits
    assert _aux(moe)[1].item() == pytest.approx(torch.logsumexp(logits, -1).pow(2).mean().item(), rel=1e-6)


def test_padding_tokens_do_not_change_the_aux_loss():
    torch.manual_seed(0)
    moe = MoE(16, 24, n_experts=4, top_k=2).eval()
    x = torch.randn(2, 7, 16)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    with torch.no_grad():
        moe(x, mask)
        padded = [t.clone() for t in _aux(moe)]
        x2 = x.clone()
        x2[1, 4:] = torch.randn(3, 16) * 10  # whatever sits at padding positions
        moe(x2, mask)
        assert torch.allclose(_aux(moe)[0], padded[0]) and torch.allclose(_aux(moe)[1], padded[1])
        moe(x[mask][None])  # only the real tokens, no mask
        assert torch.allclose(_aux(moe)[0], padded[0]) and torch.allclose(_aux(moe)[1], padded[1])
        moe(x)  # the padding positions counted: a different value
        assert not torch.allclose(_aux(moe)[0], padded[0])


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
@pytest.mark.parametrize("e,k,cf", [(4, 2, None), (8, 2, None), (3, 1, None), (4, 2, 1.0), (8, 3, 0.5)])
def test_sparse_dispatch_equals_the_dense_reference(dispatch, e, k, cf):
    if dispatch == "grouped" and not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm is not in this torch")
    torch.manual_seed(e * 10 + k)
    fast = MoE(24, 40, n_experts=e, top_k=k, capacity_factor=cf, dispatch=dispatch)
    ref = MoE(24, 40, n_experts=e, top_k=k, capacity_factor=cf, dispatch="reference")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(3, 11, 24)  # 33 tokens: no multiple of E
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = fast(x1), ref(x2)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(y1, fast.reference(x), atol=1e-5, rtol=1e-4)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-4)
    for (n, p1), p2 in zip(fast.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-5, rtol=1e-4, msg=n)


def test_sparse_dispatch_under_autocast_matches_the_reference():
    torch.manual_seed(0)
    moe = MoE(32, 48, n_experts=4, top_k=2)
    x = torch.randn(2, 9, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast = moe(x)
        moe.dispatch = "reference"
        ref = moe(x)
    assert fast.dtype == torch.bfloat16
    torch.testing.assert_close(fast.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_capacity_factor_drops_late_tokens_and_second_choices_first():
    # every token prefers expert 0, then expert 1: capacity = ceil(1.0 * 6 tokens * 2 / 2) = 6 per expert
    logits = torch.tensor([[2.0, 1.0]] * 6)
    moe = _hand_routed(logits, top_k=1)
    moe.capacity_factor = 1.0  # top-1: capacity ceil(6 * 1 / 2) = 3: tokens 0-2 served, 3-5 dropped
    with torch.no_grad():
        y = moe(torch.eye(6)[None])[0]
        moe.capacity_factor = None
        full = moe(torch.eye(6)[None])[0]
    assert torch.equal(y[3:], torch.zeros(3, 6)) and torch.allclose(y[:3], full[:3])
    # top-2 with capacity 2 per expert: slot-0 choices (all expert 0) fill expert 0 with tokens 0, 1; slot-1
    # choices (all expert 1) fill expert 1 with tokens 0, 1; tokens 2-5 get nothing
    moe = _hand_routed(torch.tensor([[2.0, 1.0, -9.0]] * 6), top_k=2)
    moe.capacity_factor = 0.5  # ceil(0.5 * 6 * 2 / 3) = 2
    keep = moe.keep_mask(torch.tensor([[0, 1]] * 6))
    assert keep.tolist() == [[1, 1], [1, 1]] + [[0, 0]] * 4
    # slot priority: token 0's second choice (expert 0) loses to tokens 1-2's first choices
    moe.capacity_factor = 2 / 3  # capacity ceil(2/3 * 3 * 2 / 3) = 2 for 3 tokens
    keep = moe.keep_mask(torch.tensor([[1, 0], [0, 1], [0, 2]]))
    assert keep.tolist() == [[1, 0], [1, 1], [1, 1]]


def test_moe_config_errors_name_the_field():
    with pytest.raises(ValueError, match="moe_top_k=3 must be in \\[1, model.n_experts=2\\]"):
        zoo.build_model("mixtral", **TINY, n_experts=2, moe_top_k=3)
    with pytest.raises(ValueError, match="moe_dispatch='fast'; valid choices: auto, grouped, loop, reference"):
        zoo.build_model("mixtral", **TINY, moe_dispatch="fast")
    with pytest.raises(ValueError, match="moe_capacity_factor must be > 0"):
        zoo.build_model("mixtral", **TINY, moe_capacity_factor=0)


def test_active_and_total_parameters():
    m = zoo.build_model("mixtral", **TINY, d_ff=48, n_experts=4, moe_top_k=1)
    experts = TINY["n_layers"] * 4 * 3 * TINY["d_model"] * 48
    assert m.num_params() - m.num_params(active=True) == experts * 3 // 4
    dense = zoo.build_model("gpt", **TINY, ffn="swiglu", d_ff=48, bias=False, position="rope", norm="rmsnorm",
                            n_kv_heads=2, tie_embeddings=False)
    router = TINY["n_layers"] * 4 * TINY["d_model"]
    assert m.num_params(active=True) == dense.num_params() + router
    assert m.flops_per_token(64) == pytest.approx(dense.flops_per_token(64) + 6 * router)


def test_gqa_with_repeated_kv_heads_equals_mha_and_shrinks_the_cache():
    torch.manual_seed(0)
    gqa = perturbed(zoo.build_model("mixtral", **TINY, n_kv_heads=2))
    mha = zoo.build_model("mixtral", **TINY, n_kv_heads=4).eval()
    hd, state = gqa.cfg.head_dim, gqa.state_dict()
    for i in range(TINY["n_layers"]):
        w = state[f"trunk.blocks.{i}.attn.qkv.weight"]
        q, k, v = w.split([4 * hd, 2 * hd, 2 * hd])
        rep = lambda t: t.view(2, hd, -1).repeat_interleave(2, 0).reshape(4 * hd, -1)  # noqa: E731
        state[f"trunk.blocks.{i}.attn.qkv.weight"] = torch.cat([q, rep(k), rep(v)])
    mha.load_state_dict(state)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids), mha(ids), atol=1e-5, rtol=1e-5)
        cache = gqa.new_cache()
        gqa(ids, cache=cache)
    assert cache[0]["k"].shape[1] == 2  # GQA keeps n_kv_heads of keys, not n_heads


@pytest.mark.parametrize("name,kw", [("mixtral", {}), ("mixtral", {"n_kv_heads": 1}),
                                     ("mixtral", {"attention": {"core": "sliding_window", "window": 6}}),
                                     ("gpt", {"ffn": "moe", "n_kv_heads": 2})])
def test_cached_greedy_decoding_equals_uncached(name, kw):
    torch.manual_seed(0)
    # larger weights than the init so that the argmax is decided by the inputs, not by ties
    model = zoo.build_model(name, **{**TINY, **kw}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(8.0)
    prompt = torch.randint(0, 97, (2, 5))
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    plain = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(cached, plain)
    assert len(set(cached[0, 5:].tolist())) > 1  # not a degenerate constant continuation


def test_bench_moe_tiny_writes_its_tables(tmp_path):
    import bench_moe

    rows = bench_moe.main(["--tiny", "--steps", "1", "--new-tokens", "3", "--context", "16", "--out", str(tmp_path)])
    assert not [r for r in rows if "error" in r]
    assert {r["variant"] for r in rows if r["part"] == "train"} >= {"dense swiglu", "moe 8x top-2, grouped"}
    decode = [r for r in rows if r["part"] == "decode"]
    assert {r["attention"] for r in decode} == {"MHA", "GQA (2 kv heads)", "MQA"}
    assert all(r["same_tokens"] == 1.0 for r in decode if r["variant"].startswith("transformers"))
    assert (tmp_path / "bench_moe.md").read_text().count("|") > 20 and (tmp_path / "bench_moe.csv").exists()


@pytest.mark.parametrize("overrides", [["model=mixtral"], ["model=gpt", "ffn=moe", "model.moe_z_coef=0.001"],
                                       ["model=retro", "ffn=moe"]])
def test_smoke_training_with_moe(tmp_path, overrides):
    cfg = make_cfg(tmp_path, *overrides, "logger=csv", "trainer.max_steps=12", "trainer.val_check_interval=6")
    metrics = train_script.train(cfg)
    assert metrics["global_step"] == 12 and math.isfinite(metrics["val/loss"])
    assert cfg.model.ffn == "moe"
    assert 0 <= metrics["moe/load_min_l1"] <= 1 / 8 <= metrics["moe/load_max_l1"] <= 1
    assert metrics["moe/active_params"] < metrics["params"]
    assert metrics["train/moe_aux"] > 0 and 0 < metrics["moe/balance_loss"] < 8 * 2  # E * k bounds it
    rows = list(csv.DictReader(next((tmp_path / "csv").rglob("metrics.csv")).open()))
    loads = [[float(r[f"moe/load_l{i}_e{j}"]) for j in range(8)] for r in rows if r.get("moe/load_l0_e0")
             for i in range(2)]
    assert loads and all(sum(row) == pytest.approx(1.0, abs=1e-4) for row in loads)  # each layer's shares
    model, mcfg = zoo.load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert mcfg.ffn == "moe"
    out = model.generate(torch.tensor([[100, 101]]), 4, temperature=0)
    assert out.shape == (1, 6)


def test_every_task_adds_the_routing_loss(tmp_path):
    """Classification (not only language modelling) trains an MoE model with its load-balancing loss."""
    cfg = make_cfg(tmp_path, "model=bert", "task=classification", "ffn=moe", "logger=csv", "trainer.max_steps=4",
                   "trainer.val_check_interval=4")
    metrics = train_script.train(cfg)
    assert metrics["train/moe_aux"] > 0


def test_moe_vs_dense_arms_have_the_parameters_they_claim(tmp_path):
    from omegaconf import OmegaConf

    def model(arm):
        cfg = make_cfg(tmp_path, "experiment=moe_vs_dense", f"moe_vs_dense={arm}", smoke=False)
        return zoo.build_model({**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": 320})

    dense, active, total = model("dense"), model("moe_equal_active"), model("moe_equal_total")
    router = 4 * 8 * 256  # layers x experts x d_model: the only parameters the dense model lacks
    assert active.num_params(active=True) == dense.num_params() + router
    assert total.num_params() == dense.num_params() + router
    assert active.num_params() > 3 * dense.num_params() and total.num_params(active=True) < dense.num_params()
    assert [model(a).cfg.n_kv_heads for a in ("mha", "dense", "mqa")] == [8, 2, 1]


def test_curves_script_tabulates_val_loss_by_tokens_and_time(tmp_path):
    import curves

    for name, losses in (("dense", (3.0, 2.5)), ("moe_equal_active", (2.9, 2.3))):
        run = tmp_path / f"0_{name}"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(
            f"model:\n  name: {name}\n  max_seq_len: 64\ndata:\n  batch_size: 4\n  seq_len: ${{model.max_seq_len}}\n")
        (run / "csv" / "version_0").mkdir(parents=True)
        (run / "csv" / "version_0" / "metrics.csv").write_text(
            "step,train/elapsed_s,train/loss,val/loss\n"
            f"9,1.5,3.1,\n9,,,{losses[0]}\n19,3.0,2.6,\n19,,,{losses[1]}\n")
    out = curves.main([str(tmp_path), f"out={tmp_path / 'c'}"])
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [(r["run"], r["step"], r["tokens"], r["elapsed_s"], r["val/loss"]) for r in rows] == [
        ("dense", "10", "2560", "1.5", "3.0"), ("dense", "20", "5120", "3.0", "2.5"),
        ("moe_equal_active", "10", "2560", "1.5", "2.9"), ("moe_equal_active", "20", "5120", "3.0", "2.3")]
    assert out.with_suffix(".png").stat().st_size > 0


def test_curves_joins_resumed_logs_and_labels_a_sweep_by_its_overrides(tmp_path):
    """A run resumed from step 10 wrote version_1: its points replace version_0's from step 11 on and its wall
    time continues version_0's at the resume; runs sharing model.name are told apart by their overrides."""
    import curves

    for core, acc in (("full", "0.4"), ("linear", "0.2")):
        run = tmp_path / f"0_attention={core},experiment=lra"
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text("model:\n  name: lra\ndata:\n  batch_size: 2\n  seq_len: 8\n")
        for version, text in (("0", "9,5.0,\n9,,0.1\n19,9.0,\n19,,0.3\n"), ("1", f"10,1.0,\n19,4.0,\n19,,{acc}\n")):
            (run / "csv" / f"version_{version}").mkdir(parents=True)
            (run / "csv" / f"version_{version}" / "metrics.csv").write_text("step,train/elapsed_s,val/acc\n" + text)
        # resumed once more at the last step only to score the test split: it replaces none of the points
        (run / "csv" / "version_2").mkdir(parents=True)
        (run / "csv" / "version_2" / "metrics.csv").write_text("step,test/acc\n19,0.5\n")
    out = curves.main([str(tmp_path), f"out={tmp_path / 'c'}", "metric=val/acc"])
    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [(r["run"], r["step"], r["tokens"], r["elapsed_s"], r["val/acc"]) for r in rows] == [
        ("attention=full", "10", "160", "5.0", "0.1"), ("attention=full", "20", "320", "9.0", "0.4"),
        ("attention=linear", "10", "160", "5.0", "0.1"), ("attention=linear", "20", "320", "9.0", "0.2")]
