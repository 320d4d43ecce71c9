"""Corpus, tokenizers, data modules and the resumable batch order."""
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

from data import CausalLMDataModule, MLMDataModule, build_tokenizer, load_corpus, tokenizer_from_state, tokenizer_state
from data.corpus import split_corpus
from data.loading import ResumableBatchSampler

JSON_PKG = str(Path(sysconfig.get_paths()["stdlib"]) / "json")


def test_stdlib_corpus_is_real_sorted_and_split_deterministically():
    docs = load_corpus("stdlib")
    assert len(docs) > 300 and sum(len(d.text) for d in docs) > 5_000_000
    assert [d.name for d in docs] == sorted(d.name for d in docs)
    assert not any("/test/" in f"/{d.name}" or "site-packages" in d.name for d in docs)
    train, val = split_corpus(docs, 5.0)
    assert {d.name for d in train}.isdisjoint({d.name for d in val})
    assert 0.02 < len(val) / len(docs) < 0.09
    assert [d.name for d in split_corpus(docs, 5.0)[1]] == [d.name for d in val]


def test_byte_tokenizer_round_trips_unicode():
    tok = build_tokenizer("byte")
    text = "naïve — 数 🐍"
    assert tok.decode(tok.encode(text)) == text
    assert tok.n_tokens == 261 and tok.mask_id not in tok.encode(text)


def test_ids_tokenizer_round_trips_refuses_text_and_survives_the_checkpoint():
    from data.mqar import MQARDataModule
    dm = MQARDataModule(vocab_size=64, seq_len=32, num_kv_pairs=4)
    tok = dm.load_tokenizer()
    assert dm.vocab_size == 64 and tok.n_tokens == 64  # the task's ids, not the byte tokenizer's 261
    assert tok.encode(" 3 17\n40 ") == [3, 17, 40] and tok.decode([3, 17, 40]) == "3 17 40"
    with pytest.raises(ValueError, match=r"space-separated integers in \[0, 64\)"):
        tok.encode("def ")
    with pytest.raises(ValueError, match=r"\[64\] outside \[0, 64\)"):
        tok.encode("1 64")
    again = tokenizer_from_state(tokenizer_state(tok))
    assert again.name == "ids" and again.n_tokens == 64 and again.encode("5") == [5]


def test_bpe_round_trips_and_survives_the_checkpoint(tmp_path):
    texts = [d.text for d in load_corpus(JSON_PKG)]
    tok = build_tokenizer("bpe", texts, vocab_size=300, cache_dir=tmp_path, key="json")
    s = "def decode(self, s):\n    return json.loads(s)  # ok"
    assert tok.decode(tok.encode(s)) == s
    assert len(tok.encode(s)) < len(s.encode())  # it merges something
    again = tokenizer_from_state(tokenizer_state(tok))
    assert again.encode(s) == tok.encode(s)
    assert len(list(tmp_path.glob("bpe-300-*.json"))) == 1


def _dm(cls, tmp_path, **kw):
    dm = cls(source=JSON_PKG, seq_len=32, batch_size=4, cache_dir=str(tmp_path), **kw)
    dm.setup()
    return dm


def test_causal_windows_are_shifted_and_contiguous(tmp_path):
    dm = _dm(CausalLMDataModule, tmp_path)
    train, _, _ = dm.token_streams()
    a, b = dm.train_set[(0, 0, 0)], dm.train_set[(0, 1, 0)]
    assert torch.equal(a["input_ids"][1:], a["labels"][:-1])
    assert torch.equal(a["labels"][-1:], b["input_ids"][:1])  # window i+1 starts where i's targets end
    stream = np.concatenate([dm.train_set[(0, i, 0)]["input_ids"].numpy() for i in range(3)])
    assert np.array_equal(stream, np.asarray(train[: len(stream)]))


def test_mlm_masking_is_bert_like_and_deterministic(tmp_path):
    dm = _dm(MLMDataModule, tmp_path)
    tok = dm.load_tokenizer()
    items = [dm.train_set[(0, i, 0)] for i in range(len(dm.train_set))]
    labels = torch.stack([it["labels"] for it in items])
    inputs = torch.stack([it["input_ids"] for it in items])
    chosen = labels != -100
    assert 0.12 < chosen.float().mean() < 0.18
    assert (inputs[:, 0] == tok.cls_id).all() and not chosen[:, 0].any()
    masked = (inputs == tok.mask_id) & chosen
    kept = (inputs == labels) & chosen
    assert 0.75 < masked.sum() / chosen.sum() < 0.85
    assert 0.06 < kept.sum() / chosen.sum() < 0.16  # 10% unchanged, plus random draws that hit the same byte
    assert torch.equal(dm.train_set[(0, 3, 0)]["input_ids"], items[3]["input_ids"])
    assert not torch.equal(dm.train_set[(1, 3, 0)]["labels"], items[3]["labels"])  # a new epoch, a new mask


def test_batch_order_shards_ranks_and_resumes():
    full = [b for b in ResumableBatchSampler(40, 4, True, seed=1)]
    ranks = [[i for b in ResumableBatchSampler(40, 4, True, seed=1, rank=r, world=2) for _, i, _ in b] for r in (0, 1)]
    assert set(ranks[0]).isdisjoint(ranks[1]) and len(set(ranks[0]) | set(ranks[1])) == 40
    s = ResumableBatchSampler(40, 4, True, seed=1)
    s.load_state_dict({"epoch": 0, "consumed": 6})
    assert list(s) == full[6:]
    s.set_epoch(1)
    assert [i for b in s for _, i, _ in b] != [i for b in full for _, i, _ in b]


def test_too_small_data_names_the_fields():
    with pytest.raises(ValueError, match="data.batch_size=8"):
        ResumableBatchSampler(5, 8, True, seed=0)
