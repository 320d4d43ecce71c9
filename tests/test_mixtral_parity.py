"""Hugging Face Mixtral import and export: same logits, greedy tokens and aux loss both ways; directories load.

Random-init tiny MixtralForCausalLM only (no hub). Every parameter is perturbed after init so that a swapped
gate/up half, a transposed expert or a misplaced kv head changes the logits.
"""
import copy
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402

import zoo  # noqa: E402
from helpers import perturbed  # noqa: E402
from zoo.hf_mixtral import from_hf_mixtral, to_hf_mixtral  # noqa: E402

ATOL = 1e-4
VOCAB = 101


def hf_mixtral(attn="eager", **kw):
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
               sliding_window=None, router_aux_loss_coef=0.02, tie_word_embeddings=False, bos_token_id=0,
               eos_token_id=0, pad_token_id=None)
    cfg.update(kw)
    return perturbed(MixtralForCausalLM._from_config(MixtralConfig(**cfg), attn_implementation=attn))


def inputs(batch=3, seq=12):
    ids = torch.randint(0, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 7:] = 0  # right padding in two rows of different lengths
    mask[2, 3:] = 0
    return ids, mask


def close(a, b, mask=None):
    if mask is not None:  # padded positions are undefined in both implementations
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item() < ATOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("window", [None, 5])
def test_import_matches_hf_logits_and_aux_loss(attn, padded, window):
    hf = hf_mixtral(attn, sliding_window=window)
    model = from_hf_mixtral(hf.config.to_dict(), hf.state_dict())
    c = model.cfg
    assert c.attention["core"] == ("sliding_window" if window else "causal") and c.attention.get("window") == window
    assert (c.ffn, c.n_experts, c.moe_top_k, c.n_kv_heads, c.position, c.norm) == ("moe", 4, 2, 2, "rope", "rmsnorm")
    assert c.moe_aux_coef == 0.02 and not c.tie_embeddings
    ids, mask = inputs()
    m = mask if padded else None
    with torch.no_grad():
        out = hf(ids, attention_mask=m, output_router_logits=True)
        ours = model(ids, m)
        assert close(ours, out.logits, mask if padded else None)
        # HF's aux_loss (load_balancing_loss_func, padding excluded) is our unweighted balance loss
        assert model.moe_losses()[0].item() == pytest.approx(out.aux_loss.item(), rel=1e-5)
        assert model.aux_loss().item() == pytest.approx(0.02 * out.aux_loss.item(), rel=1e-5)
        # and HF's training loss is the token loss plus router_aux_loss_coef * aux_loss
        labels = ids.masked_fill(mask == 0, -100) if padded else ids
        hf_loss = hf(ids, attention_mask=m, labels=labels, output_router_logits=True).loss
        shift = torch.nn.functional.cross_entropy(ours[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1),
                                                  ignore_index=-100)
        assert (shift + model.aux_loss()).item() == pytest.approx(hf_loss.item(), rel=1e-5)


@pytest.mark.parametrize("kv_heads,window", [(4, None), (2, None), (1, None), (2, 7)])  # MHA, GQA, MQA, Mistral
def test_greedy_tokens_match_hf_generate(kv_heads, window):
    hf = hf_mixtral("sdpa", num_key_value_heads=kv_heads, sliding_window=window)
    with torch.no_grad():  # larger weights: the greedy argmax is then decided by the model, not by ties
        for p in hf.parameters():
            p.mul_(4.0)
    model = from_hf_mixtral(hf.config.to_dict(), hf.state_dict())
    prompt = torch.randint(0, VOCAB, (2, 6))
    ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16, do_sample=False,
                      min_new_tokens=16, pad_token_id=0)
    cache = model.new_cache()
    ours = model.generate(prompt, 16, temperature=0)
    assert torch.equal(ours, ref)
    if window:  # the rolling buffer keeps the cache bounded by the window, not the 22 tokens seen
        model(prompt, cache=cache)
        model(ours[:, 6:], start_pos=6, cache=cache)
        assert cache[0]["k"].shape[2] < window
    assert torch.equal(model.generate(prompt, 16, temperature=0, use_cache=False), ref)


def test_tied_embeddings_and_mixtral_model_state_dicts_import():
    hf = hf_mixtral(tie_word_embeddings=True)
    model = from_hf_mixtral(hf.config.to_dict(), hf.state_dict())
    assert model.cfg.tie_embeddings
    ids, _ = inputs()
    with torch.no_grad():
        assert close(model(ids), hf(ids).logits)
    # MixtralModel's names (no 'model.' prefix, no head) fit too; the head then stays the tied embedding
    trunk = {k.removeprefix("model."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    again = from_hf_mixtral(hf.config.to_dict(), trunk)
    with torch.no_grad():
        assert close(again(ids), hf(ids).logits)


def test_load_pretrained_reads_what_hf_saved_and_export_round_trips(tmp_path):
    hf = hf_mixtral("sdpa")
    hf.save_pretrained(tmp_path / "hf")  # transformers writes the original per-expert spelling
    saved = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert saved["model_type"] == "mixtral"
    ids, mask = inputs()
    model, cfg = zoo.load_pretrained(tmp_path / "hf")
    assert cfg is model.cfg and not model.training
    with torch.no_grad():
        assert close(model(ids, mask), hf(ids, attention_mask=mask).logits, mask)
    zoo.save_pretrained(model, tmp_path / "back")
    for loaded in (MixtralForCausalLM.from_pretrained(tmp_path / "back"),
                   AutoModelForCausalLM.from_pretrained(tmp_path / "back", attn_implementation="eager")):
        assert type(loaded).__name__ == "MixtralForCausalLM"
        with torch.no_grad():
            out = loaded.eval()(ids, attention_mask=mask, output_router_logits=True)
            assert close(out.logits, hf(ids, attention_mask=mask).logits, mask)
            model(ids, mask)
            assert model.moe_losses()[0].item() == pytest.approx(out.aux_loss.item(), rel=1e-5)
    again, _ = zoo.load_pretrained(tmp_path / "back")
    with torch.no_grad():
        assert close(again(ids, mask), model(ids, mask), mask)


def test_zoo_mixtral_exports_to_hf_with_equal_logits(tmp_path):
    model = perturbed(zoo.build_model("mixtral", vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=1,
                                     d_ff=48, n_experts=4, moe_top_k=1, tie_embeddings=True,
                                     attention="sliding_window", max_seq_len=128))
    config, state = to_hf_mixtral(model)
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in state and config["num_experts_per_tok"] == 1
    assert config["sliding_window"] == 64
    zoo.save_pretrained(model, tmp_path)
    hf = MixtralForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = inputs()
    with torch.no_grad():
        assert close(hf(ids, attention_mask=mask).logits, model(ids, mask), mask)


def test_export_refuses_what_mixtral_cannot_express(tmp_path):
    model = zoo.build_model("mixtral", vocab_size=VOCAB, d_model=32, n_layers=1, moe_capacity_factor=1.25,
                            bias=True)
    both = r"(?=.*bias=True \(needs False\))(?=.*moe_capacity_factor=1.25 \(needs None\))"
    with pytest.raises(ValueError, match=both):
        zoo.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_expert_weights_are_reported(tmp_path):
    hf = hf_mixtral()
    hf.save_pretrained(tmp_path)
    from safetensors.torch import load_file, save_file
    state = load_file(str(tmp_path / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(zoo.CheckpointError, match=r"layer 1 lacks expert weights \['w3\[2\]'\]"):
        zoo.load_pretrained(tmp_path)


def test_unsupported_rope_scaling_is_named():
    hf = hf_mixtral()
    c = hf.config.to_dict()
    c["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0}
    with pytest.raises(ValueError, match="rope_type='yarn'"):
        from_hf_mixtral(c, hf.state_dict())


@pytest.mark.gpu
def test_cuda_bf16_prefill_and_cached_decode_stay_as_close_to_fp32_as_hf():
    """On the H200, scripts/bench_moe.py found none of HF's greedy tokens equal to ours at a 4K context in bf16
    (the benchmark's doubled random weights made its model chaotic in bf16, for both; reproduced on CPU). Here
    both bf16 models, prefill and then cached decoding steps, are held against HF in float32: at each step ours
    may be no further from it than twice HF's own bf16 error. Every token takes both experts (2 of 2): a router near-tie flipping in bf16 would move either
    model by a discrete jump that says nothing about the arithmetic."""
    from transformers import DynamicCache
    torch.manual_seed(0)
    hf = hf_mixtral("sdpa", hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=2, num_local_experts=2, num_experts_per_tok=2,
                    max_position_embeddings=1100).cuda().eval()
    ours = from_hf_mixtral(hf.config.to_dict(), {k: v.cpu() for k, v in hf.state_dict().items()})
    ours = ours.cuda().to(torch.bfloat16).eval()
    hf16 = copy.deepcopy(hf).to(torch.bfloat16)
    seq = torch.randint(0, VOCAB, (4, 1024), device="cuda")
    with torch.no_grad():
        cache, hf_cache = ours.new_cache(), DynamicCache(config=hf16.config)
        mine = ours(seq, cache=cache)[:, -1]
        theirs = hf16(seq, past_key_values=hf_cache, use_cache=True).logits[:, -1]
        for step in range(6):
            ref = hf(seq).logits[:, -1].double()
            our_err = (mine.double() - ref).abs().max().item()
            hf_err = (theirs.double() - ref).abs().max().item()
            assert our_err <= 2 * hf_err + 1e-2, (step, our_err, hf_err)
            nxt = ref.argmax(-1, keepdim=True)  # the same next token for both
            seq = torch.cat([seq, nxt], 1)
            mine = ours(nxt, start_pos=seq.shape[1] - 1, cache=cache)[:, -1]
            theirs = hf16(nxt, past_key_values=hf_cache, use_cache=True).logits[:, -1]
