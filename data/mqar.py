"""Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): a synthetic recall task.

An example is `num_kv_pairs` key-value pairs, then the same keys queried again, each query followed by its
value, in a random order at random places of the rest of the sequence (filler token 0 elsewhere):

    k1 v1 k2 v2 ... kP vP   0 0 k2 v2 0 0 0 k1 v1 0 ... kP vP 0 0

The model reads the sequence causally and is scored only where it must recall: at each query key, the
next token is that key's value (labels there; -100 everywhere else). Keys are distinct within an example
and drawn from the lower half of the vocabulary (token 0 excluded), values from the upper half, as in
Zoology, so a key and a value can never be confused. Zoology places queries with a power-law bias towards
the context; here the query slots are uniform over the query region (longer key-query distances on
average, which is what separates a fixed window or a fixed-size state from full attention).

Deterministic: the examples of a split are a function of (seed, split) only.

`train_mix` trains on Zoology's mixture instead of the evaluated setting alone: a list of
[seq_len, num_kv_pairs, num_examples] parts, each generated at its own length and pairs, then right-padded
with the filler (labels -100) to the model's length. Zoology's own mixture is 100K examples of (64, 4) and
20K each of (128, 8), (256, 16), (256, 32), (256, 64): the short, few-pair examples are where recall is
learned first, and the induction head then serves every setting. Validation stays at (seq_len, num_kv_pairs).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from data.loading import ResumableDataModule
from data.tokenizers import IdTokenizer, pad_vocab

SPLITS = {"train": 0, "val": 1}


def check_mqar(vocab_size: int, seq_len: int, num_kv_pairs: int) -> None:
    if num_kv_pairs < 1:
        raise ValueError(f"data.num_kv_pairs must be positive, got {num_kv_pairs}")
    if num_kv_pairs > vocab_size // 2 - 1:
        raise ValueError(f"data.num_kv_pairs={num_kv_pairs} needs data.vocab_size >= {2 * (num_kv_pairs + 1)} "
                         f"(distinct keys come from the lower half of the vocabulary, token 0 excluded), "
                         f"got {vocab_size}")
    if seq_len + 1 < 4 * num_kv_pairs:
        raise ValueError(f"data.seq_len={seq_len} is too short for data.num_kv_pairs={num_kv_pairs}: "
                         f"the pairs and their queries need seq_len >= {4 * num_kv_pairs - 1}")


def generate_mqar(n: int, *, vocab_size: int, seq_len: int, num_kv_pairs: int, seed: int, split: str = "train"):
    """n examples as (input_ids, labels), both (n, seq_len) int64; labels are -100 except at query keys."""
    check_mqar(vocab_size, seq_len, num_kv_pairs)
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid choices: {', '.join(SPLITS)}")
    rng = np.random.default_rng([seed, SPLITS[split]])
    p, half = num_kv_pairs, vocab_size // 2
    # distinct keys: the first p of a random permutation of 1 .. half-1, per example
    keys = np.argsort(rng.random((n, half - 1)), axis=1)[:, :p] + 1
    values = rng.integers(half, vocab_size, size=(n, p))
    seq = np.zeros((n, seq_len + 1), dtype=np.int64)  # one more token than the input: the last target
    seq[:, 0 : 2 * p : 2], seq[:, 1 : 2 * p : 2] = keys, values
    # the query region is cut into 2-token slots; each key is asked in one of them, chosen uniformly
    n_slots = (seq_len + 1 - 2 * p) // 2
    slots = np.argsort(rng.random((n, n_slots)), axis=1)[:, :p]
    pos = 2 * p + 2 * slots
    rows = np.arange(n)[:, None]
    seq[rows, pos], seq[rows, pos + 1] = keys, values
    labels = np.full((n, seq_len), -100, dtype=np.int64)
    labels[rows, pos] = values  # at the query key, the next token is its value
    return torch.from_numpy(seq[:, :-1].copy()), torch.from_numpy(labels)


def check_train_mix(train_mix, vocab_size: int, seq_len: int) -> list[tuple[int, int, int]]:
    """data.train_mix as (seq_len, num_kv_pairs, num_examples) tuples, each checked; errors name the part."""
    if isinstance(train_mix, (str, bytes)) or not hasattr(train_mix, "__len__") or not len(train_mix):
        raise ValueError(f"data.train_mix must be a non-empty list of [seq_len, num_kv_pairs, num_examples], "
                         f"got {train_mix!r}")
    parts = []
    for i, part in enumerate(train_mix):
        if isinstance(part, (str, bytes)) or not hasattr(part, "__len__") or len(part) != 3 \
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in part):
            raise ValueError(f"data.train_mix[{i}]={part!r}: expected [seq_len, num_kv_pairs, num_examples] "
                             "(three integers)")
        n, pairs, count = part
        if not 1 <= n <= seq_len or count < 1:
            raise ValueError(f"data.train_mix[{i}]={list(part)}: seq_len must be 1 .. data.seq_len ({seq_len}) "
                             f"and num_examples positive")
        try:
            check_mqar(vocab_size, n, pairs)
        except ValueError as e:
            raise ValueError(f"data.train_mix[{i}]={list(part)}: {e}") from None
        parts.append((n, pairs, count))
    return parts


def generate_mqar_mix(parts, *, vocab_size: int, seq_len: int, seed: int):
    """The train split of a mixture: each part at its own length and pairs (its own seed stream), right-padded
    with filler and -100 to seq_len, parts concatenated (the loader shuffles)."""
    xs, ys = [], []
    for i, (n, pairs, count) in enumerate(parts):
        x, y = generate_mqar(count, vocab_size=vocab_size, seq_len=n, num_kv_pairs=pairs, seed=seed * 1000 + i)
        xs.append(torch.nn.functional.pad(x, (0, seq_len - n), value=0))
        ys.append(torch.nn.functional.pad(y, (0, seq_len - n), value=-100))
    return torch.cat(xs), torch.cat(ys)


class _MQARSet(Dataset):
    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, key):
        epoch, i, b = key
        return {"input_ids": self.input_ids[i], "labels": self.labels[i], "batch_number": b}


class MQARDataModule(ResumableDataModule):
    """MQAR train/val splits of fixed size, generated once at setup, served in a resumable order."""

    def __init__(self, vocab_size: int = 256, seq_len: int = 128, num_kv_pairs: int = 8, num_train: int = 20000,
                 num_val: int = 1000, batch_size: int = 64, seed: int = 1234, num_workers: int = 0,
                 max_val_batches: int | None = None, train_mix=None):
        super().__init__()
        check_mqar(vocab_size, seq_len, num_kv_pairs)
        self.train_mix = None if train_mix is None else check_train_mix(train_mix, vocab_size, seq_len)
        if batch_size < 1 or num_train < 1 or num_val < 1:
            raise ValueError("data.batch_size, data.num_train and data.num_val must be positive")
        self.vocab, self.seq_len, self.num_kv_pairs = vocab_size, seq_len, num_kv_pairs
        self.num_train, self.num_val, self.batch_size, self.seed = num_train, num_val, batch_size, seed
        self.num_workers, self.max_val_batches = num_workers, max_val_batches

    @property
    def vocab_size(self) -> int:
        # the task's own ids (to a multiple of 64): not the byte tokenizer's 261, as a wider output layer slows
        # recall down a lot (see data.tokenizers.IdTokenizer)
        return pad_vocab(self.vocab)

    def load_tokenizer(self):
        # MQAR tokens are bare ids: checkpoints carry the ids tokenizer (prompts and samples as integers)
        return IdTokenizer(self.vocab)

    def setup(self, stage=None):
        kw = dict(vocab_size=self.vocab, seq_len=self.seq_len, num_kv_pairs=self.num_kv_pairs, seed=self.seed)
        n_val = min(self.num_val, self.max_val_batches * self.batch_size) if self.max_val_batches else self.num_val
        if self.train_mix is None:
            self.train_set = _MQARSet(*generate_mqar(self.num_train, split="train", **kw))
        else:  # data.num_train does not apply: the parts give their own counts
            self.train_set = _MQARSet(*generate_mqar_mix(self.train_mix, vocab_size=self.vocab, seq_len=self.seq_len,
                                                         seed=self.seed))
        self.val_set = _MQARSet(*generate_mqar(n_val, split="val", **kw))
