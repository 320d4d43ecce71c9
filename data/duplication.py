"""The duplication task of the Reformer paper (Kitaev et al. 2020, section 5): sequences `0 w 0 w`.

w is `seq_len / 2 - 1` symbols drawn uniformly from 1 .. vocab_size - 1 (0 is the separator). The model reads
the sequence causally and is scored only on the second copy: labels[t] = input_ids[t + 1] for the positions
that predict the second w, -100 elsewhere. Solving it needs attention from each position of the second copy to
the matching position of the first, seq_len / 2 tokens back: a local pattern cannot, LSH can when the query
and the key it needs (the same symbol's embedding plus a position) hash together, which more hash rounds make
likelier. The paper: seq_len 1024, 127 symbols (vocab 128), a 1-layer model.

Deterministic: the examples of a split are a function of (seed, split) only.
"""
from __future__ import annotations

import numpy as np
import torch

from data.mqar import SPLITS, MQARDataModule, _MQARSet


def check_duplication(vocab_size: int, seq_len: int) -> None:
    if vocab_size < 2:
        raise ValueError(f"data.vocab_size must be >= 2 (separator 0 and at least one symbol), got {vocab_size}")
    if seq_len < 4 or seq_len % 2:
        raise ValueError(f"data.seq_len={seq_len} must be even and >= 4 (the sequence is 0 w 0 w)")


def generate_duplication(n: int, *, vocab_size: int, seq_len: int, seed: int, split: str = "train"):
    """n examples as (input_ids, labels), both (n, seq_len) int64."""
    check_duplication(vocab_size, seq_len)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid choices: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split], 7])  # 7: not MQAR's stream for the same seed
    m = seq_len // 2 - 1
    w = rng.integers(1, vocab_size, size=(n, m))
    seq = np.zeros((n, seq_len), dtype=np.int64)
    seq[:, 1:m + 1], seq[:, m + 2:] = w, w
    labels = np.full((n, seq_len), -100, dtype=np.int64)
    labels[:, m + 1:seq_len - 1] = seq[:, m + 2:]  # from the second separator on, the next token is known
    return torch.from_numpy(seq), torch.from_numpy(labels)


class DuplicationDataModule(MQARDataModule):
    """Duplication train/val splits of fixed size, generated once at setup (loading as MQAR's module)."""

    def __init__(self, vocab_size: int = 128, seq_len: int = 1024, num_train: int = 20000, num_val: int = 1000,
                 batch_size: int = 64, seed: int = 1234, num_workers: int = 0, max_val_batches: int | None = None):
        check_duplication(vocab_size, seq_len)
        # MQAR's checks do not apply (no key-value pairs); its loaders, vocabulary and tokenizer do
        super().__init__(vocab_size=max(vocab_size, 4), seq_len=max(seq_len, 3), num_kv_pairs=1, num_train=num_train,
                         num_val=num_val, batch_size=batch_size, seed=seed, num_workers=num_workers,
                         max_val_batches=max_val_batches)
        self.vocab, self.seq_len = vocab_size, seq_len

    def setup(self, stage=None):
        kw = dict(vocab_size=self.vocab, seq_len=self.seq_len, seed=self.seed)
        n_val = min(self.num_val, self.max_val_batches * self.batch_size) if self.max_val_batches else self.num_val
        self.train_set = _MQARSet(*generate_duplication(self.num_train, split="train", **kw))
        self.val_set = _MQARSet(*generate_duplication(n_val, split="val", **kw))
