"""Longformer and BigBird against `transformers` (random init, nothing downloaded): converted weights give the
same outputs, and zoo.load_pretrained / save_pretrained round-trip through HF directories."""
import numpy as np
import pytest
import torch

import zoo
from zoo.hf import from_hf_big_bird, from_hf_longformer

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def ids(b, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 97, (b, n), generator=g)  # ids 0-2 are RoBERTa's specials (1 = padding)


def padded(b, n, cut):
    m = torch.ones(b, n, dtype=torch.long)
    m[-1, n - cut:] = 0
    return m


def close_on_real(a, b, mask):
    keep = mask.bool()[..., None]
    torch.testing.assert_close(a * keep, b * keep, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------------ Longformer

def longformer(cls=False, **kw):
    cfg = transformers.LongformerConfig(**SMALL, max_position_embeddings=130, attention_window=8, type_vocab_size=1,
                                        pad_token_id=1, num_labels=3, **kw)
    torch.manual_seed(0)
    model = (transformers.LongformerForSequenceClassification if cls else transformers.LongformerForMaskedLM)(cfg)
    return model.eval()


@pytest.mark.parametrize("n", [40, 45])  # 45: HF pads to a multiple of the window, the zoo core inside
def test_longformer_mlm_matches_transformers_with_global_tokens_and_padding(n):
    hf = longformer()
    ours = from_hf_longformer(hf.config, hf.state_dict())
    x, mask = ids(2, n), padded(2, n, 6)
    gm = torch.zeros(2, n, dtype=torch.long)
    gm[0, 0] = 1
    gm[1, [2, 17]] = 1
    for m, g in ((None, None), (mask, None), (mask, gm), (None, gm)):
        with torch.no_grad():
            want = hf(input_ids=x, attention_mask=m, global_attention_mask=g).logits
            got = ours(x, attention_mask=m, global_attention_mask=g)
        close_on_real(got, want, m if m is not None else torch.ones(2, n))


def test_longformer_classifier_matches_with_its_global_first_token():
    hf = longformer(cls=True)
    ours = from_hf_longformer(hf.config, hf.state_dict())
    x = ids(2, 37)
    with torch.no_grad():  # neither side is given a global mask: both make the first token global
        torch.testing.assert_close(ours.classify(x), hf(input_ids=x).logits, atol=2e-5, rtol=2e-5)


def test_longformer_directories_round_trip(tmp_path):
    hf = longformer()
    hf.save_pretrained(tmp_path / "hf")
    ours, cfg = zoo.load_pretrained(tmp_path / "hf")
    assert cfg.attention["core"] == "longformer" and cfg.attention["window"] == 8 and cfg.max_seq_len == 128
    zoo.save_pretrained(ours, tmp_path / "back")
    again = transformers.LongformerForMaskedLM.from_pretrained(tmp_path / "back").eval()
    x, gm = ids(1, 33), torch.zeros(1, 33, dtype=torch.long)
    gm[0, 5] = 1
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=x, global_attention_mask=gm).logits,
                                   hf(input_ids=x, global_attention_mask=gm).logits, atol=2e-5, rtol=2e-5)


def test_longformer_with_per_layer_windows_is_refused():
    hf = longformer()
    cfg = hf.config.to_dict()
    cfg["attention_window"] = [8, 16]
    with pytest.raises(ValueError, match="differs per layer"):
        from_hf_longformer(cfg, hf.state_dict())


# ------------------------------------------------------------------------------------------------ BigBird

def big_bird(cls=False, **kw):
    cfg = transformers.BigBirdConfig(**SMALL, max_position_embeddings=128, block_size=4, num_random_blocks=2,
                                     attention_type="block_sparse", num_labels=3, **kw)
    torch.manual_seed(0)
    return (transformers.BigBirdForSequenceClassification if cls else transformers.BigBirdForMaskedLM)(cfg)


def hf_random_layout(hf, n):
    """The random blocks HF's block-sparse attention draws for length n: it reseeds numpy with the layer's seed on
    every training-mode call (and uses no random blocks in eval), so training mode with dropout 0 is
    deterministic and the same draw can be replayed here, head by head."""
    out = []
    for layer in hf.bert.encoder.layer:
        att = layer.attention.self
        bs, r = att.block_size, att.num_random_blocks
        np.random.seed(att.seed)
        plan, plan_r = att._get_rand_attn_plan(n, bs, r)
        rand = att._bigbird_block_rand_mask_with_head(
            from_seq_length=n, to_seq_length=n, from_block_size=bs, to_block_size=bs,
            num_heads=att.num_attention_heads, plan_from_length=plan, plan_num_rand_blocks=plan_r)
        nb = n // bs
        layout = torch.full((att.num_attention_heads, nb, r), -1, dtype=torch.long)
        layout[:, 1:-1] = torch.as_tensor(np.stack(rand))  # HF lists rows for blocks 1 .. nb-2 (the others are global)
        out.append(layout)
    return out


@pytest.mark.parametrize("n,cut", [(64, 0), (64, 7), (62, 0)])  # 62: both pad to 64 inside
def test_big_bird_mlm_matches_transformers_on_the_same_random_layout(n, cut):
    hf = big_bird().train()  # training mode = HF's seeded random blocks; dropout is 0, so it is deterministic
    ours = from_hf_big_bird(hf.config, hf.state_dict())
    n_pad = -(-n // 4) * 4
    for block, layout in zip(ours.trunk.blocks, hf_random_layout(hf, n_pad)):
        block.attn.core.random_blocks[n_pad // 4] = layout
        block.attn.core._tables.clear()
    x, mask = ids(2, n, seed=1), padded(2, n, cut) if cut else torch.ones(2, n, dtype=torch.long)
    with torch.no_grad():
        want = hf(input_ids=x, attention_mask=mask).logits
        got = ours(x, attention_mask=mask)
    close_on_real(got, want, mask)
    # and the layout matters: the zoo's own seeded layout gives other outputs
    fresh = from_hf_big_bird(hf.config, hf.state_dict())
    with torch.no_grad():
        assert not torch.allclose(fresh(x, attention_mask=mask), want, atol=1e-4)


def test_big_bird_directories_round_trip(tmp_path):
    hf = big_bird(cls=True).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours, cfg = zoo.load_pretrained(tmp_path / "hf")
    assert cfg.attention["core"] == "bigbird" and cfg.attention["block_size"] == 4 and cfg.num_labels == 3
    zoo.save_pretrained(ours, tmp_path / "back")
    again = transformers.BigBirdForSequenceClassification.from_pretrained(tmp_path / "back").eval()
    sd, sd2 = hf.state_dict(), again.state_dict()
    for k in sd:
        if not k.startswith("bert.pooler"):  # BigBird's classifier does not use the pooler: it is not carried
            torch.testing.assert_close(sd[k], sd2[k])
