"""LightningDataModules: packed causal-LM windows, masked-LM windows, and sequence classification.

The corpus is tokenized once and cached as .npy under `cache_dir`, keyed by everything that shapes
it (source, its size, tokenizer, split), so a changed corpus is never read from a stale cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.corpus import load_corpus, split_corpus
from data.loading import ResumableDataModule
from data.tokenizers import ByteTokenizer, build_tokenizer, pad_vocab


def _encode(tok, texts: list[str]) -> list[np.ndarray]:
    if isinstance(tok, ByteTokenizer):
        return [np.frombuffer(t.encode("utf-8"), dtype=np.uint8).astype(np.int32) for t in texts]
    return [np.asarray(ids, dtype=np.int32) for ids in tok.encode_batch(texts)]


def _save_atomic(path: Path, array: np.ndarray) -> None:
    # a temporary name of this process's own: ranks that build the same cache never write one file together
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
    np.save(tmp, array)
    tmp.replace(path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


class _CorpusDataModule(ResumableDataModule):
    def __init__(self, source: str = "stdlib", tokenizer: str = "byte", bpe_vocab_size: int = 4096,
                 seq_len: int = 256, batch_size: int = 16, val_percent: float = 5.0, seed: int = 1234,
                 num_workers: int = 0, cache_dir: str = ".cache/zoo", max_val_batches: int | None = None,
                 max_docs: int | None = None):
        super().__init__()
        if max_docs is not None and max_docs < 2:
            raise ValueError(f"data.max_docs must be at least 2 (a training and a validation document), got {max_docs}")
        if seq_len < 2:
            raise ValueError(f"data.seq_len must be at least 2, got {seq_len}")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be positive, got {batch_size}")
        self.source, self.tokenizer_kind, self.bpe_vocab_size = source, tokenizer, bpe_vocab_size
        self.seq_len, self.batch_size, self.val_percent, self.seed = seq_len, batch_size, val_percent, seed
        self.num_workers, self.cache_dir, self.max_val_batches = num_workers, Path(cache_dir), max_val_batches
        self.max_docs = max_docs
        self.tokenizer = None

    def documents(self):
        """The corpus, or its first data.max_docs documents (a tiny corpus for smoke runs)."""
        docs = load_corpus(self.source)
        return docs[: self.max_docs] if self.max_docs else docs

    # -- corpus -----------------------------------------------------------------------------
    def _key(self, docs) -> str:
        ident = {"source": self.source, "docs": len(docs), "chars": sum(len(d.text) for d in docs),
                 "tok": self.tokenizer_kind, "vocab": self.bpe_vocab_size, "val": self.val_percent,
                 "python": sys.version.split()[0] if self.source == "stdlib" else None}
        return hashlib.sha1(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    def load_tokenizer(self, docs=None):
        """The tokenizer (BPE is trained on the training split once, then read from the cache)."""
        if self.tokenizer is None:
            docs = docs if docs is not None else self.documents()
            train, _ = split_corpus(docs, self.val_percent)
            self.tokenizer = build_tokenizer(self.tokenizer_kind, (d.text for d in train), self.bpe_vocab_size,
                                             self.cache_dir, key=self._key(docs))
        return self.tokenizer

    @property
    def vocab_size(self) -> int:
        return pad_vocab(self.load_tokenizer().n_tokens)

    def prepare_data(self):
        # Lightning runs this in one process per node before setup() in every rank: one process tokenizes
        self.token_streams()

    def token_streams(self) -> tuple[np.ndarray, np.ndarray, float]:
        """Train and val token streams (documents joined by <eos>) and val bytes per token."""
        docs = self.documents()
        key = self._key(docs)
        paths = [self.cache_dir / f"{key}-{s}.npy" for s in ("train", "val")]
        meta = self.cache_dir / f"{key}-meta.json"
        tok = self.load_tokenizer(docs)
        if not all(p.exists() for p in paths) or not meta.exists():
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            splits = split_corpus(docs, self.val_percent)
            for path, split in zip(paths, splits):
                parts = []
                for ids in _encode(tok, [d.text for d in split]):
                    parts += [ids, np.array([tok.eos_id], dtype=np.int32)]
                _save_atomic(path, np.concatenate(parts))
            val_bytes = sum(len(d.text.encode("utf-8")) for d in splits[1])
            val_tokens = int(np.load(paths[1], mmap_mode="r").shape[0])
            _write_text_atomic(meta, json.dumps({"val_bytes_per_token": val_bytes / val_tokens}))
        train, val = (np.load(p, mmap_mode="r") for p in paths)
        return train, val, json.loads(meta.read_text())["val_bytes_per_token"]

    def _cap_val(self) -> None:
        """Keep the first max_val_batches global batches of validation (every run validates on the same ones,
        whatever its number of processes)."""
        if self.max_val_batches:
            n = min(len(self.val_set), self.max_val_batches * self.batch_size * self._rank_world()[1])
            self.val_set.truncate(n)


class _Windows(Dataset):
    """Non-overlapping windows of `length` tokens from a token stream (the final partial one dropped)."""

    def __init__(self, stream: np.ndarray, length: int):
        self.stream, self.length = stream, length
        self.n = (len(stream) - 1) // (length - 1) if length > 1 else 0

    def __len__(self):
        return self.n

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)

    def window(self, i: int) -> torch.Tensor:
        start = i * (self.length - 1)
        return torch.from_numpy(np.array(self.stream[start : start + self.length], dtype=np.int64))


class _CausalWindows(_Windows):
    def __getitem__(self, key):
        epoch, i, b = key
        w = self.window(i)  # seq_len + 1 tokens: inputs and next-token targets overlap by all but one
        return {"input_ids": w[:-1], "labels": w[1:], "batch_number": b}


class CausalLMDataModule(_CorpusDataModule):
    """Packed windows of seq_len tokens from the joined documents; labels are the next tokens."""

    def setup(self, stage=None):
        train, val, self.val_bytes_per_token = self.token_streams()
        self.train_set = _CausalWindows(train, self.seq_len + 1)
        self.val_set = _CausalWindows(val, self.seq_len + 1)
        self._cap_val()


class _MaskedWindows(_Windows):
    """BERT masking (Devlin et al. 2019): 15% of positions are predicted; of those 80% become <mask>,
    10% a random token, 10% stay. Randomness is seeded by (seed, epoch, index): reproducible anywhere."""

    def __init__(self, stream, length, tok, vocab_size, seed, mask_prob=0.15):
        # windows of seq_len + 1 advance by seq_len; dropping each one's last token gives non-overlapping seq_len
        super().__init__(stream, length + 1)
        self.tok, self.vocab, self.seed, self.mask_prob = tok, tok.n_tokens, seed, mask_prob
        self.special = torch.tensor(tok.special_ids)

    def __getitem__(self, key):
        epoch, i, b = key
        ids = self.window(i)[:-1]
        ids[0] = self.tok.cls_id
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) * 1_000_003 + i)
        chosen = (torch.rand(ids.shape, generator=g) < self.mask_prob) & ~torch.isin(ids, self.special)
        labels = torch.where(chosen, ids, torch.full_like(ids, -100))
        roll = torch.rand(ids.shape, generator=g)
        random_tokens = torch.randint(0, 256 if self.tok.name == "byte" else self.vocab, ids.shape, generator=g)
        inputs = torch.where(chosen & (roll < 0.8), torch.full_like(ids, self.tok.mask_id), ids)
        inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_tokens, inputs)
        return {"input_ids": inputs, "labels": labels, "batch_number": b}


class MLMDataModule(_CorpusDataModule):
    """Packed windows (RoBERTa's FULL-SENTENCES packing) with <cls> first and BERT's 80/10/10 masking."""

    def __init__(self, mask_prob: float = 0.15, **kw):
        super().__init__(**kw)
        if not 0 < mask_prob < 1:
            raise ValueError(f"data.mask_prob must be in (0, 1), got {mask_prob}")
        self.mask_prob = mask_prob

    def setup(self, stage=None):
        train, val, self.val_bytes_per_token = self.token_streams()
        tok = self.load_tokenizer()
        self.train_set = _MaskedWindows(train, self.seq_len, tok, self.vocab_size, self.seed, self.mask_prob)
        self.val_set = _MaskedWindows(val, self.seq_len, tok, self.vocab_size, self.seed + 1, self.mask_prob)
        self._cap_val()


class _LabelledChunks(Dataset):
    def __init__(self, chunks: list[np.ndarray], labels: list[int], seq_len: int, tok):
        self.chunks, self.labels, self.seq_len, self.tok = chunks, labels, seq_len, tok

    def __len__(self):
        return len(self.chunks)

    def truncate(self, n: int) -> None:
        self.chunks, self.labels = self.chunks[:n], self.labels[:n]

    def __getitem__(self, key):
        epoch, i, b = key
        ids = torch.full((self.seq_len,), self.tok.pad_id, dtype=torch.long)
        chunk = torch.from_numpy(self.chunks[i].astype(np.int64))
        ids[0] = self.tok.cls_id
        ids[1 : 1 + len(chunk)] = chunk
        mask = torch.zeros(self.seq_len, dtype=torch.long)
        mask[: 1 + len(chunk)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": self.labels[i], "batch_number": b}


class ClassificationDataModule(_CorpusDataModule):
    """Which package a piece of code comes from: a real classification task on the default corpus.

    Labels are the `num_classes` largest top-level folders of the corpus (for the stdlib: asyncio,
    email, tkinter, ...); an example is a chunk of one file, <cls> first, padded to seq_len.
    """

    def __init__(self, num_classes: int = 8, **kw):
        super().__init__(**kw)
        self.num_classes = num_classes

    def setup(self, stage=None):
        docs = [d for d in self.documents() if "/" in d.name]
        sizes: dict[str, int] = {}
        for d in docs:
            top = d.name.split("/")[0]
            sizes[top] = sizes.get(top, 0) + len(d.text)
        if len(sizes) < 2:
            raise ValueError(f"data.source={self.source!r} needs at least two sub-folders to give class labels")
        self.classes = sorted(sorted(sizes, key=lambda k: -sizes[k])[: self.num_classes])
        self.num_classes = len(self.classes)
        tok = self.load_tokenizer()
        train, val = split_corpus([d for d in docs if d.name.split("/")[0] in self.classes], self.val_percent)
        self.train_set, self.val_set = (self._chunks(split, tok) for split in (train, val))
        self._cap_val()
        self.val_bytes_per_token = 1.0

    def _chunks(self, docs, tok) -> _LabelledChunks:
        body = self.seq_len - 1
        chunks, labels = [], []
        for d, ids in zip(docs, _encode(tok, [d.text for d in docs])):
            for s in range(0, max(1, len(ids) - body // 4), body):  # skip tails shorter than a quarter chunk
                chunks.append(ids[s : s + body])
                labels.append(self.classes.index(d.name.split("/")[0]))
        # interleave deterministically so that val batches (unshuffled) mix classes
        order = np.random.default_rng(self.seed).permutation(len(chunks))
        return _LabelledChunks([chunks[i] for i in order], [labels[i] for i in order], self.seq_len, tok)
