"""MQAR: the generator's structure and determinism, the recall gap on a tiny task, and Hydra end to end."""
from __future__ import annotations

import sys

import pytest
import torch

import zoo
from zoo.blocks.cores import CORES
from data.mqar import MQARDataModule, generate_mqar
from helpers import ROOT, make_cfg
from zoo.tasks.language_modeling import token_cross_entropy

sys.path.insert(0, str(ROOT / "scripts"))
import train as train_script  # noqa: E402


def test_generator_is_deterministic_and_seeded():
    a = generate_mqar(20, vocab_size=64, seq_len=48, num_kv_pairs=6, seed=3)
    b = generate_mqar(20, vocab_size=64, seq_len=48, num_kv_pairs=6, seed=3)
    c = generate_mqar(20, vocab_size=64, seq_len=48, num_kv_pairs=6, seed=4)
    val = generate_mqar(20, vocab_size=64, seq_len=48, num_kv_pairs=6, seed=3, split="val")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[0], val[0])


@pytest.mark.parametrize("vocab,seq_len,pairs", [(64, 48, 6), (256, 128, 32), (32, 15, 4)])
def test_generator_structure(vocab, seq_len, pairs):
    x, y = generate_mqar(50, vocab_size=vocab, seq_len=seq_len, num_kv_pairs=pairs, seed=0)
    assert x.shape == y.shape == (50, seq_len) and x.dtype == y.dtype == torch.int64
    half = vocab // 2
    for ids, labels in zip(x.tolist(), y.tolist()):
        keys, values = ids[0:2 * pairs:2], ids[1:2 * pairs:2]
        assert len(set(keys)) == pairs and all(1 <= k < half for k in keys)
        assert all(half <= v < vocab for v in values)
        kv = dict(zip(keys, values))
        answers = [(t, lab) for t, lab in enumerate(labels) if lab != -100]
        # every key is queried once, after the context, and the label is its value
        assert sorted(ids[t] for t, _ in answers) == sorted(keys)
        for t, lab in answers:
            assert t >= 2 * pairs and lab == kv[ids[t]]
            if t + 1 < seq_len:
                assert ids[t + 1] == lab  # teacher forcing: the value follows its query
        # outside the context and the query/answer pairs, only the filler token
        used = set(range(2 * pairs)) | {t for t, _ in answers} | {t + 1 for t, _ in answers}
        assert all(ids[t] == 0 for t in range(seq_len) if t not in used)


@pytest.mark.parametrize("kw,message", [
    ({"num_kv_pairs": 40, "vocab_size": 64}, "data.num_kv_pairs=40 needs data.vocab_size >= 82"),
    ({"num_kv_pairs": 8, "seq_len": 20}, "data.seq_len=20 is too short"),
    ({"num_kv_pairs": 0}, "data.num_kv_pairs must be positive"),
])
def test_bad_sizes_name_the_field(kw, message):
    args = {"vocab_size": 256, "seq_len": 64, "num_kv_pairs": 8, **kw}
    with pytest.raises(ValueError, match=message):
        MQARDataModule(**args)


def test_train_mix_pads_each_part_and_keeps_validation_at_the_evaluated_setting():
    dm = MQARDataModule(vocab_size=64, seq_len=48, num_kv_pairs=8, num_val=10,
                        train_mix=[[16, 2, 30], [48, 8, 20]])
    dm.setup()
    x, y = dm.train_set.input_ids, dm.train_set.labels
    assert x.shape == y.shape == (50, 48)
    answered = (y != -100).sum(1)
    assert (answered[:30] == 2).all() and (answered[30:] == 8).all()
    assert (x[:30, 16:] == 0).all() and (y[:30, 16:] == -100).all()  # the short part's padding: filler, unscored
    part, _ = generate_mqar(30, vocab_size=64, seq_len=16, num_kv_pairs=2, seed=dm.seed * 1000)
    assert torch.equal(x[:30, :16], part)  # each part is the plain generator at its own size
    assert ((dm.val_set.labels != -100).sum(1) == 8).all()  # validation: the evaluated setting


@pytest.mark.parametrize("mix,message", [
    ([[16, 2]], r"data.train_mix\[0\]=\[16, 2\]: expected \[seq_len, num_kv_pairs, num_examples\]"),
    ([[16, 2, 5], [64, 4, 5]], r"data.train_mix\[1\]=\[64, 4, 5\]: seq_len must be 1 .. data.seq_len \(48\)"),
    ([[16, 6, 5]], r"data.train_mix\[0\]=\[16, 6, 5\]: data.seq_len=16 is too short"),
    ([], "data.train_mix must be a non-empty list"),
])
def test_bad_train_mix_names_the_part(mix, message):
    with pytest.raises(ValueError, match=message):
        MQARDataModule(vocab_size=64, seq_len=48, num_kv_pairs=8, train_mix=mix)


def _recall_accuracy(attention, steps: int = 200, seed: int = 0) -> float:
    """A 2-layer, 64-wide decoder trained on 8-pair MQAR (vocab 64, 64 tokens) for `steps` batches of 64;
    accuracy at the 4096 query positions of 512 held-out examples."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=64, seq_len=64, num_kv_pairs=8, seed=seed)
    x, y = generate_mqar(steps * 64, **kw)
    xv, yv = generate_mqar(512, split="val", **kw)
    m = zoo.build_model("gpt", n_layers=2, d_model=64, n_heads=2, max_seq_len=64, vocab_size=64,
                        position="rope", attention=attention)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for s in range(steps):
        loss = token_cross_entropy(m(x[s * 64:(s + 1) * 64]), y[s * 64:(s + 1) * 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = m.eval()(xv).argmax(-1)
    mask = yv != -100
    return (pred[mask] == yv[mask]).float().mean().item()


def test_recall_ordering_softmax_over_linear_over_short_window():
    """The recall gap in miniature (Zoology). Chance is 1/32 (32 values); knowing which 8 values the context
    holds gives 1/8. After 200 steps exact attention is past that (0.11-0.15 over seeds 0-2, measured),
    the elu+1 state of the same width is below it (0.05-0.09), and a 4-token window, which cannot reach
    the pairs from most queries, stays at chance whatever it trains (0.03). Full recall takes thousands of
    steps: that is experiment=mqar, on a GPU."""
    softmax = _recall_accuracy({"core": "causal"})
    linear = _recall_accuracy({"core": "linear"})
    assert softmax > 0.08 and softmax > linear, (softmax, linear)
    if "sliding_window" in CORES:
        window = _recall_accuracy({"core": "sliding_window", "window": 4}, steps=100)
        assert window < 0.06 and softmax > window + 0.05, (softmax, window)


def test_smoke_trains_performer(tmp_path):
    metrics = train_script.train(make_cfg(tmp_path, "model=performer", "logger=csv"))
    assert metrics["global_step"] == 20 and "val/acc" in metrics


def test_smoke_trains_mqar_experiment(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=mqar", "attention=performer", "data.num_kv_pairs=4", "data.vocab_size=64",
                   "data.num_train=200", "data.num_val=32", "model.max_seq_len=32", "model.d_model=32")
    assert cfg.task._target_ == "zoo.tasks.recall.AssociativeRecall" and cfg.model.n_layers == 2
    metrics = train_script.train(cfg)
    assert metrics["global_step"] == 20 and 0.0 <= metrics["val/acc"] <= 1.0


def test_smoke_trains_on_a_train_mix_from_the_command_line(tmp_path):
    cfg = make_cfg(tmp_path, "experiment=mqar", "attention=causal", "data.num_kv_pairs=4", "data.vocab_size=64",
                   "data.train_mix=[[16,2,120],[32,4,80]]", "data.num_val=32", "model.max_seq_len=32",
                   "model.d_model=32")
    metrics = train_script.train(cfg)
    assert metrics["global_step"] == 20 and 0.0 <= metrics["val/acc"] <= 1.0
