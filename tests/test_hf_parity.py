"""Hugging Face GPT-2 / BERT import and export: same logits both ways, HF directories load, errors are clear.

Random-init tiny models only (no hub). Every parameter is perturbed after init so that norms are
not all ones and biases not all zeros: a swapped or untransposed tensor then changes the logits.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification, BertConfig,
    BertForMaskedLM, BertForPreTraining, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel,
)

import zoo  # noqa: E402
from helpers import lightning_like_checkpoint, perturbed  # noqa: E402
from zoo.hf import from_hf_bert, from_hf_gpt2, to_hf_bert, to_hf_gpt2  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import export as export_script  # noqa: E402

ATOL = 1e-4
SEQ = 12


def hf_gpt2(attn="eager", **kw):
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=211, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **kw)
    return perturbed(GPT2LMHeadModel._from_config(cfg, attn_implementation=attn))


def bert_config(**kw):
    return BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
                      vocab_size=199, max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, **kw)


def hf_bert(cls=BertForMaskedLM, attn="eager", **kw):
    return perturbed(cls._from_config(bert_config(**kw), attn_implementation=attn))


def zoo_model(name, **kw):
    sizes = dict(vocab_size=211, max_seq_len=64, d_model=64, n_layers=2, n_heads=4, dropout=0.0)
    return perturbed(zoo.build_model(name, **{**sizes, **kw}))


def inputs(vocab, batch=3, padded=False):
    ids = torch.randint(0, vocab, (batch, SEQ))
    mask = torch.ones(batch, SEQ, dtype=torch.long)
    if padded:
        mask[1, 7:] = 0  # right padding in two rows of different lengths
        mask[2, 3:] = 0
    return ids, mask, torch.randint(0, 2, (batch, SEQ))


def close(a, b, mask=None):
    if mask is not None:  # padded positions are undefined in both implementations
        a, b = a[mask.bool()], b[mask.bool()]
    return (a - b).abs().max().item() < ATOL


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_gpt2_import_matches_hf(attn, padded):
    hf = hf_gpt2(attn)
    model = from_hf_gpt2(hf.config.to_dict(), hf.state_dict())
    assert model.cfg.vocab_size == 211 and model.cfg.max_seq_len == 64 and model.cfg.activation == "gelu_tanh"
    ids, mask, _ = inputs(211, padded=padded)
    with torch.no_grad():
        assert close(model(ids, mask if padded else None), hf(ids, attention_mask=mask).logits, mask)


def test_gpt2_untied_head_imports():
    hf = hf_gpt2(tie_word_embeddings=False)
    assert hf.lm_head.weight.data_ptr() != hf.transformer.wte.weight.data_ptr()
    model = from_hf_gpt2(hf.config.to_dict(), hf.state_dict())
    assert not model.cfg.tie_embeddings
    ids, _, _ = inputs(211)
    with torch.no_grad():
        assert close(model(ids), hf(ids).logits)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("padded", [False, True])
def test_bert_mlm_import_matches_hf(attn, padded):
    hf = hf_bert(attn=attn)
    model = from_hf_bert(hf.config.to_dict(), hf.state_dict())
    assert model.cfg.norm_position == "post" and model.cfg.type_vocab_size == 2 and model.cfg.num_labels == 0
    ids, mask, types = inputs(199, padded=padded)
    with torch.no_grad():
        ours = model(ids, mask, types)
        assert close(ours, hf(ids, attention_mask=mask, token_type_ids=types).logits, mask)


@pytest.mark.parametrize("padded", [False, True])
def test_bert_classifier_import_matches_hf(padded):
    hf = hf_bert(BertForSequenceClassification, attn="sdpa", num_labels=3)
    with pytest.warns(UserWarning, match="no MLM head"):  # BertForSequenceClassification has none to convert
        model = from_hf_bert(hf.config.to_dict(), hf.state_dict())
    assert model.cfg.num_labels == 3
    ids, mask, types = inputs(199, padded=padded)
    with torch.no_grad():
        assert close(model.classify(ids, mask, types), hf(ids, attention_mask=mask, token_type_ids=types).logits)


def test_round_trip_zoo_to_hf_gives_the_same_logits():
    """HF -> zoo -> HF state dict -> a fresh HF model: the original logits."""
    ids, mask, types = inputs(199, padded=True)
    for hf, back, cls in ((hf_gpt2(), to_hf_gpt2, GPT2LMHeadModel), (hf_bert(), to_hf_bert, BertForMaskedLM)):
        model = (from_hf_gpt2 if cls is GPT2LMHeadModel else from_hf_bert)(hf.config.to_dict(), hf.state_dict())
        config, state = back(model)
        fresh = cls._from_config(hf.config, attn_implementation="eager").eval()
        missing, unexpected = fresh.load_state_dict(state, strict=False)
        assert not unexpected and all("decoder" in k or k == "lm_head.weight" for k in missing)  # tied heads
        fresh.tie_weights()
        kw = {} if cls is GPT2LMHeadModel else {"token_type_ids": types}
        with torch.no_grad():
            assert close(fresh(ids, attention_mask=mask, **kw).logits, hf(ids, attention_mask=mask, **kw).logits, mask)


@pytest.mark.parametrize("kind", ["gpt2", "bert", "bert_cls", "bert_sharded", "bert_pretraining"])
def test_load_pretrained_reads_what_hf_saved(tmp_path, kind):
    hf = {"gpt2": hf_gpt2, "bert_cls": lambda: hf_bert(BertForSequenceClassification, num_labels=2),
          "bert_pretraining": lambda: hf_bert(BertForPreTraining)}.get(kind, hf_bert)()
    hf.save_pretrained(tmp_path, **({"max_shard_size": "40KB"} if kind == "bert_sharded" else {}))
    if kind == "bert_sharded":
        assert (tmp_path / "model.safetensors.index.json").exists()
    ids, mask, types = inputs(199)
    with torch.no_grad():
        if kind == "bert_cls":
            with pytest.warns(UserWarning, match="no MLM head"):
                model, cfg = zoo.load_pretrained(tmp_path)
            assert close(model.classify(ids, mask, types), hf(ids, token_type_ids=types).logits)
        else:
            model, cfg = zoo.load_pretrained(tmp_path)  # BertForPreTraining: the NSP head and pooler are dropped
            kw = {} if kind == "gpt2" else {"token_type_ids": types}
            out = hf(ids, **kw)
            ref = out.prediction_logits if kind == "bert_pretraining" else out.logits
            assert close(model(ids, None, kw.get("token_type_ids")), ref)
    assert cfg is model.cfg and not model.training


def test_weights_that_do_not_fit_the_config_are_reported(tmp_path):
    hf_bert().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))
    with pytest.raises(zoo.CheckpointError, match="do not fit config.json"):
        zoo.load_pretrained(tmp_path)


@pytest.mark.parametrize("legacy", [False, True])
def test_load_pretrained_reads_pytorch_model_bin(tmp_path, legacy):
    # transformers 5 always writes safetensors (safe_serialization=False is gone): write the .bin as older versions did
    hf = hf_bert()
    hf.config.save_pretrained(tmp_path)
    state = hf.state_dict()
    if legacy:  # BertModel-style names without 'bert.', and the TF-era LayerNorm gamma/beta
        state = {k.removeprefix("bert.").replace("LayerNorm.weight", "LayerNorm.gamma")
                 .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}
    torch.save(state, tmp_path / "pytorch_model.bin")
    model, _ = zoo.load_pretrained(tmp_path)
    ids, _, types = inputs(199)
    with torch.no_grad():
        assert close(model(ids, token_type_ids=types), hf(ids, token_type_ids=types).logits)


@pytest.mark.parametrize("case", ["gpt", "gpt_untied", "bert_mlm", "bert_cls", "bert_no_segments"])
def test_export_loads_in_transformers(tmp_path, case):
    if case.startswith("gpt"):
        model = zoo_model("gpt", tie_embeddings=case == "gpt")
        autos = [AutoModelForCausalLM]
    else:
        kw = {"num_labels": 3} if case == "bert_cls" else {"type_vocab_size": 0} if case == "bert_no_segments" else {}
        model = zoo_model("bert", **kw)
        autos = [AutoModelForMaskedLM] + ([AutoModelForSequenceClassification] if case == "bert_cls" else [])
    zoo.save_pretrained(model, tmp_path / "hf")
    ids, mask, types = inputs(211 if case.startswith("gpt") else 199, padded=True)
    types = types if model.cfg.type_vocab_size else None
    kw = {} if case.startswith("gpt") else {"token_type_ids": types}
    for auto in autos:
        hf = auto.from_pretrained(tmp_path / "hf", attn_implementation="sdpa").eval()
        with torch.no_grad():
            if auto is AutoModelForSequenceClassification:
                assert close(hf(ids, attention_mask=mask, **kw).logits, model.classify(ids, mask, types))
            else:
                assert close(hf(ids, attention_mask=mask, **kw).logits, model(ids, mask, types), mask)
    again, _ = zoo.load_pretrained(tmp_path / "hf")  # and back into the zoo
    with torch.no_grad():
        assert close(again(ids, mask, types), model(ids, mask, types), mask)


# ---- errors -------------------------------------------------------------------------------------------------


def test_unknown_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match=r"model_type='llama' is not supported; supported: gpt2, bert"):
        zoo.load_pretrained(tmp_path)


def test_missing_dir_config_or_weights(tmp_path):
    with pytest.raises(zoo.CheckpointError, match="does not exist"):
        zoo.load_pretrained(tmp_path / "nope")
    with pytest.raises(zoo.CheckpointError, match="has no config.json"):
        zoo.load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(zoo.CheckpointError, match="holds no weights: expected one of model.safetensors"):
        zoo.load_pretrained(tmp_path)


def test_truncated_safetensors_is_reported(tmp_path):
    hf_gpt2().save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(zoo.CheckpointError, match="model.safetensors is truncated or corrupt"):
        zoo.load_pretrained(tmp_path)


def test_bin_with_code_is_refused(tmp_path):
    hf_gpt2().config.save_pretrained(tmp_path)
    torch.save({"w": torch.zeros(1), "obj": Path("x")}, tmp_path / "pytorch_model.bin")
    with pytest.raises(zoo.CheckpointError, match="refusing to unpickle"):
        zoo.load_pretrained(tmp_path)


@pytest.mark.parametrize("make, field", [
    (lambda: (GPT2Config(activation_function="quick_gelu"), from_hf_gpt2), "activation_function='quick_gelu'"),
    (lambda: (GPT2Config(add_cross_attention=True), from_hf_gpt2), "add_cross_attention=True"),
    (lambda: (bert_config(position_embedding_type="relative_key"), from_hf_bert), "position_embedding_type"),
    (lambda: (bert_config(hidden_act="gelu_fast"), from_hf_bert), "hidden_act='gelu_fast'"),
])
def test_unsupported_hf_config_names_the_field(make, field):
    config, convert = make()
    with pytest.raises(ValueError, match=field):
        convert(config.to_dict(), {})


def test_save_refuses_to_overwrite(tmp_path):
    model = zoo_model("gpt")
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        zoo.save_pretrained(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
    zoo.save_pretrained(model, tmp_path, overwrite=True)
    assert (tmp_path / "keep.txt").read_text() == "precious" and (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("override, field", [
    ({"position": "rope"}, "model.position='rope'"),
    ({"n_kv_heads": 2}, "model.n_kv_heads=2"),
    ({"ffn": "swiglu"}, "model.ffn='swiglu'"),
    ({"norm": "rmsnorm"}, "model.norm='rmsnorm'"),
])
def test_export_without_hf_counterpart_names_the_field(tmp_path, override, field):
    model = zoo.build_model("gpt", vocab_size=64, max_seq_len=16, d_model=32, n_layers=1, n_heads=4, **override)
    with pytest.raises(ValueError, match=field):
        zoo.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_of_a_mean_pooled_classifier_names_the_field(tmp_path):
    """HF's sequence classifiers pool the first token: a model.pool=mean head has no counterpart."""
    model = zoo.build_model("bert", vocab_size=64, max_seq_len=16, d_model=32, n_layers=1, n_heads=4, num_labels=2,
                            pool="mean")
    with pytest.raises(ValueError, match="model.pool='mean' \\(needs 'cls'\\)"):
        zoo.save_pretrained(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_export_script(tmp_path, capsys):
    model = zoo_model("gpt")
    lightning_like_checkpoint(tmp_path / "last.ckpt", model)
    assert export_script.main([f"ckpt={tmp_path / 'last.ckpt'}", f"out={tmp_path / 'hf'}"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    ids, _, _ = inputs(211)
    with torch.no_grad():
        assert close(hf(ids).logits, model(ids))
    assert export_script.main([f"ckpt={tmp_path / 'last.ckpt'}", f"out={tmp_path / 'hf'}"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert export_script.main([f"ckpt={tmp_path / 'last.ckpt'}", f"out={tmp_path / 'hf'}", "overwrite=true"]) == 0

    rope = zoo.build_model("gpt", vocab_size=64, max_seq_len=16, d_model=32, n_layers=1, n_heads=4, position="rope")
    lightning_like_checkpoint(tmp_path / "rope.ckpt", rope)
    assert export_script.main([f"ckpt={tmp_path / 'rope.ckpt'}", f"out={tmp_path / 'rope'}"]) == 1
    assert "model.position='rope'" in capsys.readouterr().err
    assert export_script.main(["ckpt=x"]) == 2 and "missing out=" in capsys.readouterr().err
