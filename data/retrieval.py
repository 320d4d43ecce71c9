"""RETRO's retrieval database: chunk store, frozen embeddings, faiss index, neighbour search.

A data stage, not a model: ``data`` imports nothing of ``zoo`` or ``kernels``, so the frozen
encoder is handed in by the caller as ``embed_fn(tokens: LongTensor (n, chunk_len)) -> (n, d)
float32``. A task that wants the zoo's BERT passes e.g. a mean-pooled frozen BERT; see
``docs/retro.md`` (the hook is ``embed_fn`` + ``embed_key``, the name under which its embeddings
are cached).

On-disk layout of one database (``out_dir/<key>/``, key = hash of tokens, chunking and
``embed_key``)::

    meta.json          chunk_len, pad_id, n_chunks, dim, metric, normalize, embed_key
    chunks.npy         int64 (n_chunks, chunk_len) token chunks (last chunk of a doc padded)
    doc_ids.npy        int64 (n_chunks,) document id of each chunk
    continuation.npy   int64 (n_chunks,) index of the next chunk of the same document, -1 if none
    embeddings.npy     float32 (n_chunks, dim) memmap, written batch by batch
    progress.json      {"batches_done": b, "batch_size": s, "done": bool} (the resume marker)
    index_<h>.faiss    faiss index (h = hash of index kind and parameters)
    neighbours_k<k>_<h>_ids.npy / _tokens.npy   cached neighbour search for the training chunks

Every file is written to a temporary name and renamed, so an interrupted build leaves either the
old state or the new one; a rebuild skips everything already done.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch

EmbedFn = Callable[[torch.Tensor], torch.Tensor]

_METRICS = ("ip", "l2")
_INDEX_KINDS = ("auto", "flat", "ivf")


def _faiss():
    try:
        import faiss  # noqa: WPS433 (optional dependency, imported on use)
    except ImportError as e:  # pragma: no cover
        raise ImportError("data.retrieval needs faiss: pip install faiss-cpu==1.15.1") from e
    return faiss


def _check(cond: bool, field_name: str, msg: str) -> None:
    if not cond:
        raise ValueError(f"{field_name}: {msg}")


def _atomic_save_npy(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _hash(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p if isinstance(p, bytes) else repr(p).encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------- chunking


def chunk_documents(documents: Iterable[Sequence[int]], chunk_len: int, pad_id: int = 0):
    """Split documents into ``chunk_len`` chunks (last one padded with ``pad_id``).

    Returns ``chunks (n, chunk_len) int64``, ``doc_ids (n,)`` (position of the document in
    ``documents``) and ``continuation (n,)`` (index of the next chunk of the same document or -1).
    Empty documents contribute no chunk.
    """
    _check(isinstance(chunk_len, int) and chunk_len > 0, "chunk_len", f"must be a positive int, got {chunk_len!r}")
    chunks, doc_ids, cont = [], [], []
    n = 0
    for d, doc in enumerate(documents):
        toks = np.asarray(doc.cpu().numpy() if isinstance(doc, torch.Tensor) else doc, dtype=np.int64).reshape(-1)
        if toks.size == 0:
            continue
        m = -(-toks.size // chunk_len)
        padded = np.full(m * chunk_len, pad_id, dtype=np.int64)
        padded[: toks.size] = toks
        chunks.append(padded.reshape(m, chunk_len))
        doc_ids.append(np.full(m, d, dtype=np.int64))
        c = np.arange(n + 1, n + m + 1, dtype=np.int64)
        c[-1] = -1
        cont.append(c)
        n += m
    _check(n > 0, "documents", "no tokens to build a database from")
    return np.concatenate(chunks), np.concatenate(doc_ids), np.concatenate(cont)


# --------------------------------------------------------------------------- database


@dataclass
class RetrievalDatabase:
    path: Path
    chunk_len: int
    pad_id: int
    metric: str
    normalize: bool
    chunks: np.ndarray
    doc_ids: np.ndarray
    continuation: np.ndarray
    embeddings: np.ndarray
    index: object
    index_tag: str
    nprobe: int = 1
    embed_fn: Optional[EmbedFn] = field(default=None, repr=False)

    def __len__(self) -> int:
        return int(self.chunks.shape[0])

    def neighbour_tokens(self, ids: np.ndarray) -> np.ndarray:
        """(..., ) chunk ids (-1 = none) -> (..., 2 * chunk_len): chunk + continuation, padded."""
        ids = np.asarray(ids, dtype=np.int64)
        L = self.chunk_len
        out = np.full(ids.shape + (2 * L,), self.pad_id, dtype=np.int64)
        valid = ids >= 0
        out[valid, :L] = self.chunks[ids[valid]]
        nxt = np.where(valid, self.continuation[np.where(valid, ids, 0)], -1)
        has = nxt >= 0
        out[has, L:] = self.chunks[nxt[has]]
        return out


def _embed_batches(embed_fn, chunks, emb_path, progress_path, batch_size, normalize):
    """Embed ``chunks`` in batches into a memmap, resuming after the last completed batch."""
    n = chunks.shape[0]
    n_batches = -(-n // batch_size)
    prog = {"batches_done": 0, "batch_size": batch_size, "done": False}
    if progress_path.exists():
        old = json.loads(progress_path.read_text())
        if old.get("batch_size") == batch_size and emb_path.exists():
            prog = old
    if prog["done"]:
        return np.load(emb_path, mmap_mode="r")
    emb = np.load(emb_path, mmap_mode="r+") if prog["batches_done"] > 0 else None
    for b in range(prog["batches_done"], n_batches):
        lo, hi = b * batch_size, min(n, (b + 1) * batch_size)
        with torch.no_grad():
            e = embed_fn(torch.from_numpy(np.ascontiguousarray(chunks[lo:hi])))
        e = (e.detach().cpu().numpy() if isinstance(e, torch.Tensor) else np.asarray(e)).astype(np.float32)
        _check(e.ndim == 2 and e.shape[0] == hi - lo, "embed_fn",
               f"must return (n, d) for n={hi - lo} chunks, got shape {tuple(e.shape)}")
        if normalize:
            e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
        if emb is None:
            emb = np.lib.format.open_memmap(emb_path, mode="w+", dtype=np.float32, shape=(n, e.shape[1]))
        _check(e.shape[1] == emb.shape[1], "embed_fn", f"dimension changed from {emb.shape[1]} to {e.shape[1]}")
        emb[lo:hi] = e
        emb.flush()
        prog = {"batches_done": b + 1, "batch_size": batch_size, "done": b + 1 == n_batches}
        _atomic_write_json(progress_path, prog)
    del emb
    return np.load(emb_path, mmap_mode="r")


def _make_index(emb: np.ndarray, metric: str, kind: str, nlist: int, pq_m: Optional[int], seed: int):
    faiss = _faiss()
    n, d = emb.shape
    mt = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    if kind == "flat":
        index = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
        index.add(np.ascontiguousarray(emb))
        return index
    quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    if pq_m:
        _check(d % pq_m == 0, "pq_m", f"must divide the embedding dimension {d}, got {pq_m}")
        index = faiss.IndexIVFPQ(quantizer, d, nlist, pq_m, 8, mt)
    else:
        index = faiss.IndexIVFFlat(quantizer, d, nlist, mt)
    rng = np.random.default_rng(seed)
    n_train = min(n, max(64 * nlist, 256 * (2 ** 8 if pq_m else 1)))
    sample = emb[np.sort(rng.choice(n, size=n_train, replace=False))]
    index.train(np.ascontiguousarray(sample))
    for lo in range(0, n, 65536):
        index.add(np.ascontiguousarray(emb[lo:lo + 65536]))
    return index


def build_database(
    documents: Iterable[Sequence[int]],
    embed_fn: EmbedFn,
    out_dir,
    chunk_len: int = 64,
    *,
    embed_key: Optional[str] = None,
    pad_id: int = 0,
    batch_size: int = 1024,
    metric: str = "ip",
    normalize: bool = True,
    index: str = "auto",
    ivf_threshold: int = 100_000,
    nlist: Optional[int] = None,
    nprobe: int = 16,
    pq_m: Optional[int] = None,
    seed: int = 0,
) -> RetrievalDatabase:
    """Chunk ``documents`` (iterables of token ids), embed, store and index them.

    ``embed_key`` names the frozen encoder (e.g. its checkpoint hash); it is part of the cache
    key, so a different encoder gets a fresh database. Defaults to ``embed_fn.__qualname__``.
    ``index``: "flat" (exact), "ivf" (IVF-Flat, or IVF-PQ with ``pq_m`` sub-quantisers) or
    "auto" (flat below ``ivf_threshold`` chunks, IVF above). ``nlist`` defaults to ~4*sqrt(n).
    A second call with the same arguments reuses everything on disk; an interrupted call resumes.
    """
    _check(callable(embed_fn), "embed_fn", "must be callable (tokens (n, chunk_len) -> (n, d))")
    _check(isinstance(batch_size, int) and batch_size > 0, "batch_size", f"must be a positive int, got {batch_size!r}")
    _check(metric in _METRICS, "metric", f"must be one of {_METRICS}, got {metric!r}")
    _check(index in _INDEX_KINDS, "index", f"must be one of {_INDEX_KINDS}, got {index!r}")
    _check(isinstance(ivf_threshold, int) and ivf_threshold > 0, "ivf_threshold", f"must be a positive int, got {ivf_threshold!r}")
    _check(isinstance(nprobe, int) and nprobe > 0, "nprobe", f"must be a positive int, got {nprobe!r}")
    _check(nlist is None or (isinstance(nlist, int) and nlist > 0), "nlist", f"must be a positive int or None, got {nlist!r}")
    _check(pq_m is None or (isinstance(pq_m, int) and pq_m > 0), "pq_m", f"must be a positive int or None, got {pq_m!r}")
    chunks, doc_ids, cont = chunk_documents(documents, chunk_len, pad_id)
    embed_key = embed_key or getattr(embed_fn, "__qualname__", type(embed_fn).__name__)
    key = _hash("retro-db-v1", chunk_len, pad_id, metric, normalize, embed_key,
                chunks.tobytes(), doc_ids.tobytes())
    path = Path(out_dir) / key
    path.mkdir(parents=True, exist_ok=True)

    if not (path / "meta.json").exists():
        _atomic_save_npy(path / "chunks.npy", chunks)
        _atomic_save_npy(path / "doc_ids.npy", doc_ids)
        _atomic_save_npy(path / "continuation.npy", cont)
    emb = _embed_batches(embed_fn, chunks, path / "embeddings.npy", path / "progress.json",
                         batch_size, normalize)
    n, d = emb.shape
    meta = dict(chunk_len=chunk_len, pad_id=pad_id, n_chunks=n, dim=d, metric=metric,
                normalize=normalize, embed_key=embed_key)
    if not (path / "meta.json").exists():
        _atomic_write_json(path / "meta.json", meta)

    kind = index if index != "auto" else ("ivf" if n > ivf_threshold else "flat")
    if kind == "ivf":
        nlist = nlist or max(1, int(4 * np.sqrt(n)))
        _check(nlist <= n, "nlist", f"must be <= the number of chunks {n}, got {nlist}")
    tag = _hash(kind, nlist if kind == "ivf" else None, pq_m if kind == "ivf" else None, seed)
    index_path = path / f"index_{tag}.faiss"
    faiss = _faiss()
    if index_path.exists():
        idx = faiss.read_index(str(index_path))
    else:
        idx = _make_index(emb, metric, kind, nlist or 1, pq_m, seed)
        tmp = index_path.with_name(index_path.name + ".tmp")
        faiss.write_index(idx, str(tmp))
        os.replace(tmp, index_path)
    return _assemble(path, meta, emb, idx, tag, nprobe, embed_fn)


def _assemble(path, meta, emb, idx, tag, nprobe, embed_fn):
    if hasattr(idx, "nprobe"):
        idx.nprobe = nprobe
    return RetrievalDatabase(
        path=path, chunk_len=meta["chunk_len"], pad_id=meta["pad_id"], metric=meta["metric"],
        normalize=meta["normalize"], chunks=np.load(path / "chunks.npy", mmap_mode="r"),
        doc_ids=np.load(path / "doc_ids.npy"), continuation=np.load(path / "continuation.npy"),
        embeddings=emb, index=idx, index_tag=tag, nprobe=nprobe, embed_fn=embed_fn)


def load_database(path, embed_fn: Optional[EmbedFn] = None, index_tag: Optional[str] = None,
                  nprobe: int = 16) -> RetrievalDatabase:
    """Open a database directory written by :func:`build_database` (``db.path``)."""
    path = Path(path)
    _check((path / "meta.json").exists(), "path", f"{path} is not a complete retrieval database (no meta.json)")
    meta = json.loads((path / "meta.json").read_text())
    indexes = sorted(path.glob("index_*.faiss"))
    if index_tag is not None:
        indexes = [p for p in indexes if p.stem == f"index_{index_tag}"]
    _check(len(indexes) >= 1, "index_tag", f"no index found in {path}")
    _check(len(indexes) == 1, "index_tag", f"several indexes in {path}, pick one of "
           f"{[p.stem[len('index_'):] for p in indexes]}")
    idx = _faiss().read_index(str(indexes[0]))
    emb = np.load(path / "embeddings.npy", mmap_mode="r")
    return _assemble(path, meta, emb, idx, indexes[0].stem[len("index_"):], nprobe, embed_fn)


# --------------------------------------------------------------------------- search


def _search_excluding(db: RetrievalDatabase, queries: np.ndarray, exclude: Optional[np.ndarray],
                      k: int, margin: int) -> np.ndarray:
    """k nearest chunk ids per query row, dropping chunks whose doc id equals ``exclude[row]``.

    Searches k + margin, and re-searches the rows that came up short with a doubled margin until
    the whole index has been searched (for IVF: until the probed lists are exhausted). Rows with fewer than k admissible chunks are padded with -1.
    """
    n_total = db.index.ntotal
    out = np.full((queries.shape[0], k), -1, dtype=np.int64)
    todo = np.arange(queries.shape[0])
    while todo.size:
        kk = min(n_total, k + margin)
        _, I = db.index.search(np.ascontiguousarray(queries[todo], dtype=np.float32), kk)
        ok = I >= 0
        if exclude is not None:
            ok &= db.doc_ids[np.where(ok, I, 0)] != exclude[todo][:, None]
        order = np.argsort(~ok, axis=1, kind="stable")[:, :k]  # admissible hits first, rank kept
        got = np.take_along_axis(I, order, axis=1)
        got_ok = np.take_along_axis(ok, order, axis=1)
        out[todo, : got.shape[1]] = np.where(got_ok, got, -1)
        # rows still short can improve only if the search was cut by kk (not by the probed IVF
        # lists running out, which shows as -1 hits) and the index has more to give
        more = (got_ok.sum(1) < k) & (I >= 0).all(1)
        todo = todo[more] if kk < n_total else todo[:0]
        margin = max(1, margin) * 2
    return out


def neighbours(db: RetrievalDatabase, k: int = 2, margin: Optional[int] = None,
               batch_size: int = 4096, cache: bool = True, tokens: bool = True):
    """Neighbours of every database chunk, from other documents only (no leakage of its own doc).

    Returns ``ids (n_chunks, k) int64`` (-1 where fewer than k other-document chunks exist) and
    ``tokens (n_chunks, k, 2 * chunk_len) int64`` (neighbour chunk + its continuation, padded with
    ``pad_id``), or None with ``tokens=False``: the ids alone are 1 / (2 * chunk_len) of the tokens' size, and
    ``db.neighbour_tokens(ids)`` gathers the tokens of a few rows when they are needed (the data module does).
    Cached in ``db.path`` per (k, index); a second call loads the cache.
    """
    _check(isinstance(k, int) and k > 0, "k", f"must be a positive int, got {k!r}")
    _check(margin is None or (isinstance(margin, int) and margin >= 0), "margin", f"must be a non-negative int, got {margin!r}")
    _check(isinstance(batch_size, int) and batch_size > 0, "batch_size", f"must be a positive int, got {batch_size!r}")
    stem = db.path / f"neighbours_k{k}_{db.index_tag}_p{db.nprobe}"
    ids_path, tok_path = Path(f"{stem}_ids.npy"), Path(f"{stem}_tokens.npy")
    if cache and ids_path.exists():
        ids = np.load(ids_path)
    else:
        if margin is None:
            # expected same-doc hits scale with the longest document's chunk count
            margin = int(min(np.bincount(db.doc_ids).max(), 64)) + k
        n = len(db)
        ids = np.empty((n, k), dtype=np.int64)
        for lo in range(0, n, batch_size):
            hi = min(n, lo + batch_size)
            ids[lo:hi] = _search_excluding(db, np.asarray(db.embeddings[lo:hi]), db.doc_ids[lo:hi], k, margin)
        if cache:
            _atomic_save_npy(ids_path, ids)
    if not tokens:
        return ids, None
    if cache and tok_path.exists():
        return ids, np.load(tok_path, mmap_mode="r")
    toks = db.neighbour_tokens(ids)
    if cache:
        _atomic_save_npy(tok_path, toks)
    return ids, toks


def query(db: RetrievalDatabase, token_chunks, k: int = 2, embed_fn: Optional[EmbedFn] = None,
          exclude_doc_ids=None, margin: int = 8):
    """Retrieve neighbours on the fly (e.g. for a prompt during generation).

    ``token_chunks``: (m, chunk_len) tokens, or a 1-D token sequence which is split into chunks
    (last one padded). ``embed_fn`` defaults to the one the database was built/loaded with and
    must be the same frozen encoder. ``exclude_doc_ids`` (optional, (m,)) drops chunks of those
    documents. Returns ``ids (m, k)`` and ``tokens (m, k, 2 * chunk_len)`` like :func:`neighbours`.
    """
    _check(isinstance(k, int) and k > 0, "k", f"must be a positive int, got {k!r}")
    embed_fn = embed_fn or db.embed_fn
    _check(embed_fn is not None, "embed_fn", "database has no embed_fn; pass the frozen encoder it was built with")
    t = torch.as_tensor(np.asarray(token_chunks) if not isinstance(token_chunks, torch.Tensor) else token_chunks,
                        dtype=torch.long)
    if t.dim() == 1:
        t = torch.from_numpy(chunk_documents([t], db.chunk_len, db.pad_id)[0])
    _check(t.dim() == 2 and t.shape[1] == db.chunk_len, "token_chunks",
           f"must be (m, {db.chunk_len}) or 1-D, got shape {tuple(t.shape)}")
    with torch.no_grad():
        e = embed_fn(t)
    e = (e.detach().cpu().numpy() if isinstance(e, torch.Tensor) else np.asarray(e)).astype(np.float32)
    if db.normalize:
        e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    exclude = None if exclude_doc_ids is None else np.asarray(exclude_doc_ids, dtype=np.int64).reshape(-1)
    _check(exclude is None or exclude.shape[0] == t.shape[0], "exclude_doc_ids", "must have one entry per chunk")
    ids = _search_excluding(db, e, exclude, k, margin)
    return ids, db.neighbour_tokens(ids)


# --------------------------------------------------------------------------- embedders


def histogram_projection_embedder(vocab_size: int, dim: int = 64, seed: int = 0,
                                  pad_id: Optional[int] = None) -> EmbedFn:
    """A deterministic frozen embedder: token histogram times a fixed Gaussian projection.

    Cheap and content-based (chunks sharing tokens land close; the projection keeps cosine similarity of the
    bag-of-tokens vectors, Johnson-Lindenstrauss); used by tests, as a baseline, and as RETRO's default
    retriever here (conf/retro_embedder/histogram.yaml). ``pad_id`` tokens are not counted.
    """
    _check(isinstance(vocab_size, int) and vocab_size > 0, "vocab_size", f"must be a positive int, got {vocab_size!r}")
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(vocab_size, dim, generator=g)

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        hist = torch.zeros(tokens.shape[0], vocab_size)
        ones = torch.ones_like(tokens, dtype=torch.float32)
        if pad_id is not None:
            ones = ones * (tokens != pad_id)
        hist.scatter_add_(1, tokens.long() % vocab_size, ones)
        return hist @ proj

    pad = "" if pad_id is None else f",pad={pad_id}"
    embed.__qualname__ = f"histogram_projection_embedder(v={vocab_size},d={dim},seed={seed}{pad})"
    return embed
