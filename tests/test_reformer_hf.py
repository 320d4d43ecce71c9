"""model=reformer against transformers' ReformerModelWithLMHead (random init, nothing downloaded): converted
weights give the same logits (LSH with several hash rounds, lengths that are not a multiple of the chunk, padding,
axial positions), and zoo.load_pretrained / save_pretrained round-trip through HF directories."""
import pytest
import torch

import zoo
from zoo.hf_reformer import from_hf_reformer, to_hf_reformer

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "ReformerModelWithLMHead"):
    pytest.skip("this transformers no longer ships ReformerModelWithLMHead", allow_module_level=True)

SMALL = dict(vocab_size=61, hidden_size=32, num_attention_heads=4, attention_head_size=8, feed_forward_size=64,
             is_decoder=True, lsh_attn_chunk_length=8, num_buckets=4, num_hashes=2, hash_seed=3,
             hidden_dropout_prob=0.0, lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
             pad_token_id=0, eos_token_id=2)


def reformer(axial=False, **kw):
    opts = dict(SMALL, attn_layers=["lsh", "lsh"], axial_pos_embds=axial, max_position_embeddings=128,
                axial_pos_shape=[8, 16], axial_pos_embds_dim=[8, 24])
    opts.update(kw)
    cfg = transformers.ReformerConfig(**opts)
    torch.manual_seed(0)
    model = transformers.ReformerModelWithLMHead(cfg).eval()
    with torch.no_grad():  # HF initialises biases and axial weights to constants: make them informative
        for name, p in model.named_parameters():
            if name.endswith("bias") or "position_embeddings.weights" in name:
                p.normal_(0, 0.1)
    return model


def ids(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 61, (b, n), generator=g)


@pytest.mark.parametrize("n", [32, 29, 6])  # 29: HF pads to the chunk, the zoo core inside; 6 <= chunk: full
@pytest.mark.parametrize("axial", [False, True])
def test_lm_logits_match_transformers_in_float64(n, axial):
    """float64 on both sides: HF draws its rotations in the activations' dtype, and so does the zoo core."""
    hf = reformer(axial=axial).double()
    ours = from_hf_reformer(hf.config, hf.state_dict()).double()
    assert ours.cfg.reversible and ours.cfg.attention["n_hashes"] == 2 and (ours.cfg.axial_shape is not None) == axial
    x = ids(2, n)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(input_ids=x).logits, atol=1e-9, rtol=1e-9)


def test_lm_logits_match_transformers_in_float32():
    """Looser: HF combines hash rounds as exp(lse - logsumexp(lse)), which in float32 is off by up to ~0.5% for a
    token that sees only itself in every round (lse ~ -1e5, where float32's spacing is 0.008); the zoo uses a
    max-subtracted softmax there and gets exactly its own value."""
    hf = reformer()
    ours = from_hf_reformer(hf.config, hf.state_dict())
    x = ids(2, 40)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(input_ids=x).logits, atol=2e-2, rtol=1e-2)
        torch.testing.assert_close(ours(x)[:, 8:], hf(input_ids=x).logits[:, 8:], atol=2e-3, rtol=1e-3)


def test_lm_logits_match_with_padding():
    hf = reformer(num_hashes=3).double()
    ours = from_hf_reformer(hf.config, hf.state_dict()).double()
    x = ids(2, 40, seed=1)
    mask = torch.ones(2, 40, dtype=torch.long)
    mask[1, 33:] = 0
    with torch.no_grad():
        want = hf(input_ids=x, attention_mask=mask).logits
        got = ours(x, attention_mask=mask)
    keep = mask.bool()[..., None]
    torch.testing.assert_close(got * keep, want * keep, atol=1e-9, rtol=1e-9)


def test_directories_round_trip(tmp_path):
    hf = reformer(axial=True)
    hf.save_pretrained(tmp_path / "hf")
    ours, cfg = zoo.load_pretrained(tmp_path / "hf")
    assert cfg.attention["core"] == "lsh" and cfg.attention["seed"] == 3 and not cfg.attention["seed_per_layer"]
    zoo.save_pretrained(ours, tmp_path / "back")
    again = transformers.ReformerModelWithLMHead.from_pretrained(tmp_path / "back").eval()
    x = ids(1, 48)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x).logits, hf(input_ids=x).logits, atol=1e-5, rtol=1e-5)


def test_unsupported_configs_and_models_are_refused_by_name():
    with pytest.raises(ValueError, match="attn_layers"):
        from_hf_reformer(dict(SMALL, attn_layers=["local", "lsh"]), {})
    with pytest.raises(ValueError, match="num_buckets"):
        from_hf_reformer(dict(SMALL, attn_layers=["lsh"], num_buckets=[2, 4]), {})
    ours = zoo.build_model("reformer", vocab_size=61, d_model=32, n_layers=2, n_heads=4, max_seq_len=64)
    with pytest.raises(ValueError, match="seed_per_layer=true.*n_buckets=null"):
        to_hf_reformer(ours)
