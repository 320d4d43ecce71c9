"""RETRO's data stage as a LightningDataModule: chunked sequences, each with its chunks' retrieved neighbours.

Every document (tokens + <eos>) is cut into chunks of `chunk_len`, its last chunk padded with <pad>; a
sequence is `seq_len / chunk_len` consecutive chunks of that padded stream, its next-token labels -100 on
padding. The same sequences feed every arm of a comparison (retrieval on or off, a GPT of equal size), so
their losses are comparable.

- Training chunks: the database is built from the training split (data.retrieval.build_database: frozen
  embeddings, faiss index) and each chunk's `k` neighbours come from other documents only.
- Validation chunks: retrieved from the training database on the fly (data.retrieval.query), cached.
- Honest evaluation (RETRO section 4.4): for each validation chunk u, `chunk_overlap` is the share of its
  n-grams (`overlap_ngram` tokens) found in the neighbours the model reads while predicting it, those of
  chunk u - 1. `near_dup_fraction` is the share of validation chunks above `near_dup_threshold`; the task
  reports bits per byte over all chunks and over the chunks at or below the threshold.

The frozen encoder is handed in (`embedder`, a factory `embedder(vocab_size=...) -> embed_fn`): data imports
nothing of zoo. The default is data.retrieval.histogram_projection_embedder; conf/retro_embedder/bert.yaml
picks a frozen, mean-pooled zoo BERT (zoo.models.retro.frozen_bert_embedder).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.modules import _CorpusDataModule, _save_atomic
from data.retrieval import build_database, chunk_documents, histogram_projection_embedder, neighbours, query


def split_documents(stream: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """The documents of a joined stream (each followed by <eos>), each keeping its <eos>."""
    ends = np.flatnonzero(np.asarray(stream) == eos_id) + 1
    return [d for d in np.split(np.asarray(stream, dtype=np.int64), ends) if d.size]


def _ngram_hashes(tokens: np.ndarray, n: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(..., t) tokens -> hashes of the n-grams (..., t - n + 1) and whether each is free of padding."""
    if tokens.shape[-1] < n:
        empty = np.zeros(tokens.shape[:-1] + (0,), dtype=np.int64)
        return empty, empty.astype(bool)
    win = np.lib.stride_tricks.sliding_window_view(tokens, n, axis=-1)
    weights = np.random.default_rng(0).integers(1, 2**61, size=n, dtype=np.int64)
    return (win * weights).sum(-1), ~(win == pad_id).any(-1)  # the sum wraps around: a hash, not a number


def chunk_overlap(chunks: np.ndarray, previous_neighbours: np.ndarray, n: int, pad_id: int) -> np.ndarray:
    """For each chunk, the share of its n-grams (no padding) that occur in `previous_neighbours` (the tokens
    of the neighbours retrieved for the chunk before it: what the model reads while predicting it).
    chunks (c, m), previous_neighbours (c, k, r) -> (c,) in [0, 1]; 0 for a chunk with no n-gram."""
    own, own_ok = _ngram_hashes(chunks, n, pad_id)
    seen, seen_ok = _ngram_hashes(previous_neighbours, n, pad_id)
    out = np.zeros(len(chunks), dtype=np.float32)
    for i in range(len(chunks)):
        grams = own[i][own_ok[i]]
        if grams.size:
            out[i] = np.isin(grams, seen[i][seen_ok[i]]).mean()
    return out


class _Gathered:
    """Neighbour tokens gathered from the database per slice of neighbour ids: the cache holds ids (16 bytes per
    chunk at k = 2) rather than tokens (2 KiB per chunk), and a batch gathers a few rows."""

    def __init__(self, db, ids: np.ndarray):
        self.db, self.ids = db, ids

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.db.neighbour_tokens(self.ids[rows])


class _ChunkedSequences(Dataset):
    """Sequences of `n_chunks` consecutive chunks, their labels, neighbours and (validation) chunk overlaps."""

    def __init__(self, chunks, pad_id: int, n_chunks: int, neighbours=None, overlap=None):
        self.stream = chunks.reshape(-1)
        self.chunk_len = chunks.shape[1]
        self.pad_id, self.n_chunks = pad_id, n_chunks
        self.neighbours, self.overlap = neighbours, overlap
        self.n = (len(self.stream) - 1) // (n_chunks * self.chunk_len)

    def __len__(self):
        return self.n

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)

    def __getitem__(self, key):
        _, i, b = key
        seq = self.n_chunks * self.chunk_len
        w = torch.from_numpy(np.array(self.stream[i * seq: (i + 1) * seq + 1], dtype=np.int64))
        labels = w[1:].masked_fill(w[1:] == self.pad_id, -100)
        item = {"input_ids": w[:-1], "labels": labels, "batch_number": b}
        first = i * self.n_chunks
        if self.neighbours is not None:
            nb = torch.from_numpy(np.array(self.neighbours[first: first + self.n_chunks], dtype=np.int64))
            item["neighbours"], item["neighbour_mask"] = nb, nb != self.pad_id
        if self.overlap is not None:
            ov = torch.from_numpy(np.array(self.overlap[first: first + self.n_chunks], dtype=np.float32))
            ov[0] = 0.0  # the sequence's first chunk reads no neighbours (its predecessor is not in the sequence)
            item["chunk_overlap"] = ov
        return item


class RetroDataModule(_CorpusDataModule):
    def __init__(self, chunk_len: int | None = 64, k: int = 2, retrieve: bool | None = True, embedder=None,
                 index: str = "auto", nprobe: int = 16, overlap_ngram: int = 16, near_dup_threshold: float = 0.5,
                 **kw):
        super().__init__(**kw)
        # null = the model's default (the config interpolates model.chunk_len / model.retrieval, null for a GPT)
        chunk_len = 64 if chunk_len is None else chunk_len
        retrieve = bool(retrieve)
        if not isinstance(chunk_len, int) or chunk_len < 1:
            raise ValueError(f"data.chunk_len must be a positive integer, got {chunk_len!r}")
        if self.seq_len % chunk_len:
            raise ValueError(f"data.seq_len={self.seq_len} must be a multiple of data.chunk_len={chunk_len} "
                             "(a sequence is whole chunks, each with its neighbours)")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"data.k (neighbours per chunk) must be a positive integer, got {k!r}")
        if not 0.0 <= near_dup_threshold <= 1.0:
            raise ValueError(f"data.near_dup_threshold must be in [0, 1], got {near_dup_threshold}")
        self.chunk_len, self.k, self.retrieve, self.index, self.nprobe = chunk_len, k, retrieve, index, nprobe
        self.overlap_ngram, self.near_dup_threshold = overlap_ngram, near_dup_threshold
        self.embedder = embedder or histogram_projection_embedder
        self.db = None
        self.near_dup_fraction = None

    def embed_fn(self):
        return self.embedder(vocab_size=self.vocab_size, pad_id=self.load_tokenizer().pad_id)

    def database(self):
        """The training split's retrieval database (built once, then read from the cache)."""
        if self.db is None:
            train, _, _ = self.token_streams()
            tok = self.load_tokenizer()
            self.db = build_database(split_documents(train, tok.eos_id), self.embed_fn(),
                                     self.cache_dir / "retro", chunk_len=self.chunk_len, pad_id=tok.pad_id,
                                     index=self.index, nprobe=self.nprobe)
        return self.db

    def prepare_data(self):
        db = self.database()
        neighbours(db, self.k, tokens=False)
        self._validation()

    def _validation(self):
        """Validation chunks, their neighbours from the training database, overlaps and bytes per real token."""
        db = self.database()
        _, val, _ = self.token_streams()
        tok = self.load_tokenizer()
        chunks = chunk_documents(split_documents(val, tok.eos_id), self.chunk_len, tok.pad_id)[0]
        key = hashlib.sha1(chunks.tobytes() + f"{self.k}-{self.overlap_ngram}".encode()).hexdigest()[:12]
        ids_path = db.path / f"val_{key}_{db.index_tag}_p{db.nprobe}_ids.npy"
        ov_path = ids_path.with_name(ids_path.name.replace("_ids", "_overlap"))
        if not ids_path.exists() or not ov_path.exists():
            ids = np.concatenate([query(db, chunks[i: i + 4096], self.k)[0] for i in range(0, len(chunks), 4096)])
            nb = db.neighbour_tokens(ids)
            prev = np.concatenate([np.full_like(nb[:1], tok.pad_id), nb[:-1]])  # chunk u reads u - 1's neighbours
            _save_atomic(ov_path, chunk_overlap(chunks, prev, self.overlap_ngram, tok.pad_id))
            _save_atomic(ids_path, ids)
        return chunks, _Gathered(db, np.load(ids_path)), np.load(ov_path)

    def setup(self, stage=None):
        db = self.database()
        pad = self.load_tokenizer().pad_id
        n_chunks = self.seq_len // self.chunk_len
        train_nb = _Gathered(db, neighbours(db, self.k, tokens=False)[0]) if self.retrieve else None
        self.train_set = _ChunkedSequences(db.chunks, pad, n_chunks, train_nb)
        val_chunks, val_nb, overlap = self._validation()
        self.val_set = _ChunkedSequences(val_chunks, pad, n_chunks, val_nb if self.retrieve else None, overlap)
        self.near_dup_fraction = float((overlap > self.near_dup_threshold).mean())
        # bytes per token of the joined validation stream: padding adds no predicted token
        self.val_bytes_per_token = self.token_streams()[2]
        self._cap_val()

    def retriever(self):
        """For generation (ZooModel.generate(retrieve=...)): chunks (l, m) -> (neighbours, mask) from the
        training database."""
        db, pad = self.database(), self.load_tokenizer().pad_id

        def retrieve(chunks: torch.Tensor):
            tokens = torch.from_numpy(query(db, chunks.numpy(), self.k)[1])
            return tokens, tokens != pad

        return retrieve
