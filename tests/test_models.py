"""Model building: named configs, sizes, and errors that name the field."""
import pytest
import torch

import zoo


def test_named_models_build():
    gpt = zoo.build_model("gpt")
    assert gpt.cfg.arch == "decoder" and gpt.cfg.vocab_size == 320
    bert = zoo.build_model("bert", num_labels=3)
    x = torch.randint(0, 320, (2, 8))
    assert bert(x).shape == (2, 8, 320)
    assert bert.classify(x).shape == (2, 3)


def test_mean_pooling_reads_every_unpadded_token_and_no_padding():
    """model.pool=mean (LRA's image tasks): the head sees the mean of the unpadded tokens' hidden states."""
    torch.manual_seed(0)
    bert = zoo.build_model("bert", num_labels=3, pool="mean", d_model=32, n_layers=1, n_heads=4).eval()
    x = torch.randint(4, 320, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 5:] = 0
    hidden = bert.hidden_states(x, mask)
    head = bert.cls_head
    want = [head.classifier(torch.tanh(head.pool(hidden[i, : int(mask[i].sum())].mean(0)))) for i in range(2)]
    torch.testing.assert_close(bert.classify(x, mask), torch.stack(want))
    # the padded positions' tokens change nothing
    y = x.clone()
    y[1, 5:] = 7
    torch.testing.assert_close(bert.classify(y, mask)[1], bert.classify(x, mask)[1])
    cls = zoo.build_model("bert", num_labels=3, d_model=32, n_layers=1, n_heads=4).eval()
    cls.load_state_dict(bert.state_dict())
    assert not torch.allclose(cls.classify(x, mask), bert.classify(x, mask))  # the first token alone differs


def test_gpt_124m_has_gpt2_small_shape():
    m = zoo.build_model("gpt_124m")
    c = m.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.max_seq_len, c.vocab_size) == (12, 768, 12, 1024, 50304)
    assert c.vocab_size % 64 == 0
    assert 124e6 < m.num_params() < 125e6  # 124M with the padded vocabulary, tied head


@pytest.mark.parametrize("override, match", [
    ({"d_model": 100, "n_heads": 3}, "d_model=100 must be divisible by model.n_heads=3"),
    ({"n_heads": 4, "n_kv_heads": 3}, "n_heads=4 must be divisible by model.n_kv_heads=3"),
    ({"norm": "batchnorm"}, "model.norm='batchnorm'; valid choices: layernorm, rmsnorm"),
    ({"position": "alibi"}, "valid choices: learned, sinusoidal, rope, none"),
    ({"attention": {"core": "nope"}}, "attention.core='nope' is unknown; valid choices"),
    ({"attention": {"core": "full"}}, "cores that would work: causal"),
    ({"n_layer": 2}, "unknown model config field"),
    ({"pool": "max"}, "model.pool='max'; valid choices: cls, mean"),
    ({"dropout": 1.5}, "model.dropout must be in"),
    ({"share_layers": True, "ffn": "moe"}, "share_layers=true does not combine with model.ffn='moe'"),
    ({"share_layers": True, "recurrence": "xl"}, "share_layers=true does not combine with model.recurrence='xl'"),
])
def test_impossible_configs_name_the_field(override, match):
    with pytest.raises(ValueError, match=match):
        zoo.build_model("gpt", **override)


def test_unknown_model_lists_choices():
    with pytest.raises(ValueError, match="valid choices: .*bert.*gpt"):
        zoo.build_model("gtp")


def test_sequence_longer_than_position_table_is_an_error():
    m = zoo.build_model("gpt", max_seq_len=16, d_model=32, n_layers=1)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        m(torch.zeros(1, 17, dtype=torch.long))


def test_attention_override_by_name():
    m = zoo.build_model("bert", attention="full")
    assert m.cfg.attention["core"] == "full"


def test_flops_per_token_counts_matmuls():
    m = zoo.build_model("gpt_124m")
    non_embedding = m.num_params() - 50304 * 768 - 1024 * 768
    head = 50304 * 768
    causal_attention = 12 * 12 * 768 * 1024 // 2  # QK^T and PV, forward + backward, half masked
    assert m.flops_per_token(1024) == 6 * (non_embedding + head) + causal_attention


def test_train_yaml_lists_every_model_field():
    """conf/train.yaml declares each ModelConfig field (null) so any can be overridden from the command line."""
    import dataclasses

    import yaml

    declared = set(yaml.safe_load((zoo.models.registry.CONF_DIR / "train.yaml").read_text())["model"])
    assert declared == {f.name for f in dataclasses.fields(zoo.ModelConfig)}


def test_models_import_neither_lightning_nor_hydra():
    """A model is plain PyTorch: `import zoo` in a bare session pulls in no training framework."""
    import subprocess
    import sys

    code = ("import sys, zoo, zoo.blocks, zoo.models, kernels; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'lightning', 'hydra', 'omegaconf', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=zoo.models.registry.CONF_DIR.parent).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize("name", ["gpt", "bert"])
def test_shared_layers_equal_untied_layers_holding_one_block(name):
    """share_layers=true is an untied stack whose blocks all hold the same weights: equal outputs, the
    untied blocks' gradients summed into the one block, one layer's parameters, n_layers' FLOPs."""
    kw = dict(d_model=32, n_layers=3, n_heads=4, max_seq_len=16, vocab_size=64, dropout=0.0)
    torch.manual_seed(0)
    shared = zoo.build_model(name, share_layers=True, **kw)
    untied = zoo.build_model(name, **kw)
    one = shared.trunk.blocks[0].state_dict()
    untied.load_state_dict({k: v for k, v in shared.state_dict().items()})  # the state dict lists every index
    assert all(torch.equal(untied.trunk.blocks[i].state_dict()[k], v) for i in range(3) for k, v in one.items())
    x = torch.randint(0, 64, (2, 16))
    out_s, out_u = shared(x), untied(x)
    torch.testing.assert_close(out_s, out_u)
    out_s.square().mean().backward()
    out_u.square().mean().backward()
    for k, p in shared.trunk.blocks[0].named_parameters():
        summed = sum(dict(untied.trunk.blocks[i].named_parameters())[k].grad for i in range(3))
        torch.testing.assert_close(p.grad, summed, msg=k)
    per_block = sum(p.numel() for p in shared.trunk.blocks[0].parameters())
    assert shared.num_params() == untied.num_params() - 2 * per_block
    assert shared.flops_per_token(16) == untied.flops_per_token(16)


def test_one_shared_layer_is_the_untied_model():
    kw = dict(d_model=32, n_layers=1, n_heads=4, max_seq_len=16, vocab_size=64)
    torch.manual_seed(0)
    shared = zoo.build_model("gpt", share_layers=True, **kw)
    torch.manual_seed(0)
    untied = zoo.build_model("gpt", **kw)
    x = torch.randint(0, 64, (2, 16))
    torch.testing.assert_close(shared(x), untied(x), rtol=0, atol=0)
