"""RETRO retrieval database: chunking, faiss search vs brute force, exclusion, caching, resume, IVF."""
import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from data.retrieval import (  # noqa: E402
    build_database, chunk_documents, histogram_projection_embedder, load_database, neighbours, query,
)

V, L = 97, 8


class Counting:
    """Wraps an embed_fn: counts calls/rows and can fail after `fail_after` batches."""

    def __init__(self, fn, fail_after=None):
        self.fn, self.fail_after, self.calls, self.rows = fn, fail_after, 0, 0
        self.__qualname__ = fn.__qualname__

    def __call__(self, tokens):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        self.rows += tokens.shape[0]
        return self.fn(tokens)


def _corpus(n_docs=12, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(1, V, size=int(rng.integers(L // 2, 7 * L))) for _ in range(n_docs)]
    docs[1] = np.concatenate([docs[1], docs[1][:L], docs[1][:L]])  # same-doc duplicates: must be excluded
    docs[3] = np.concatenate([docs[3], docs[0][:L]])  # a cross-doc copy of doc 0's first chunk
    docs[2] = np.array([], dtype=np.int64)  # empty documents are skipped
    return docs


def _brute(db, k):
    e = np.asarray(db.embeddings, dtype=np.float64)
    s = e @ e.T
    s[db.doc_ids[:, None] == db.doc_ids[None, :]] = -np.inf
    return s, np.argsort(-s, axis=1, kind="stable")[:, :k]


def test_chunking_and_continuations():
    docs = [np.arange(1, 20), np.arange(100, 108), [5]]
    chunks, doc_ids, cont = chunk_documents(docs, chunk_len=L, pad_id=0)
    assert chunks.shape == (3 + 1 + 1, L)
    assert doc_ids.tolist() == [0, 0, 0, 1, 2]
    assert cont.tolist() == [1, 2, -1, -1, -1]
    assert chunks[2].tolist() == [17, 18, 19, 0, 0, 0, 0, 0]
    assert chunks[4].tolist() == [5] + [0] * (L - 1)


def test_exact_search_matches_brute_force_and_excludes_same_doc(tmp_path):
    docs = _corpus()
    db = build_database(docs, histogram_projection_embedder(V, 32), tmp_path, chunk_len=L, batch_size=5)
    assert type(db.index).__name__ == "IndexFlatIP"
    k = 3
    ids, toks = neighbours(db, k=k)
    s, ref = _brute(db, k)
    # same neighbours as brute force (up to float ties: compare the scores of the picks)
    rows = np.arange(len(db))[:, None]
    np.testing.assert_allclose(s[rows, ids], s[rows, ref], rtol=1e-5, atol=1e-5)
    assert (ids == ref).mean() > 0.95
    # never the same document
    assert (db.doc_ids[ids] != db.doc_ids[:, None]).all()
    # doc 0's first chunk finds its copy in doc 3 first, not anything of its own doc
    first0 = int(np.flatnonzero(db.doc_ids == 0)[0])
    copy = int(np.flatnonzero(db.doc_ids == 3)[-1])
    assert ids[first0, 0] == copy
    # neighbour tokens: chunk + continuation (padded when none)
    assert toks.shape == (len(db), k, 2 * L)
    for i in range(len(db)):
        for j in range(k):
            n = ids[i, j]
            assert (toks[i, j, :L] == db.chunks[n]).all()
            c = db.continuation[n]
            if c >= 0:
                assert db.doc_ids[c] == db.doc_ids[n] and c == n + 1
                assert (toks[i, j, L:] == db.chunks[c]).all()
            else:
                assert (toks[i, j, L:] == db.pad_id).all()
    # cached on disk: second call loads the same arrays
    ids2, toks2 = neighbours(db, k=k)
    assert (ids2 == ids).all() and (np.asarray(toks2) == toks).all()


def test_exclusion_grows_margin(tmp_path):
    # one long doc of identical chunks + a few others: the first k + margin hits are all same-doc
    rng = np.random.default_rng(1)
    base = rng.integers(1, V, size=L)
    docs = [np.tile(base, 30)] + [rng.integers(1, V, size=2 * L) for _ in range(3)]
    db = build_database(docs, histogram_projection_embedder(V, 16), tmp_path, chunk_len=L)
    ids, _ = neighbours(db, k=2, margin=0, cache=False)
    assert (ids >= 0).all()
    assert (db.doc_ids[ids] != db.doc_ids[:, None]).all()
    # fewer other-document chunks than k: padded with -1
    db2 = build_database([np.arange(1, 3 * L), np.arange(1, L)], histogram_projection_embedder(V, 16),
                         tmp_path, chunk_len=L)
    ids2, toks2 = neighbours(db2, k=2)
    in0 = db2.doc_ids == 0  # doc 0 has one other-document chunk, doc 1 has three
    assert (ids2[in0, 1] == -1).all() and (toks2[in0, 1] == 0).all() and (ids2[in0, 0] >= 0).all()
    assert (ids2[~in0] >= 0).all()


def test_cache_reused_and_interrupted_build_resumes(tmp_path):
    docs = _corpus(n_docs=20, seed=2)
    base = histogram_projection_embedder(V, 16)
    n = chunk_documents(docs, L)[0].shape[0]
    bs = 4
    n_batches = -(-n // bs)
    assert n_batches >= 6
    crashing = Counting(base, fail_after=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_database(docs, crashing, tmp_path, chunk_len=L, batch_size=bs)
    resumed = Counting(base)
    db = build_database(docs, resumed, tmp_path, chunk_len=L, batch_size=bs)
    assert resumed.calls == n_batches - 3 and resumed.rows == n - 3 * bs
    # resumed embeddings equal a from-scratch build
    fresh = build_database(docs, Counting(base), tmp_path / "fresh", chunk_len=L, batch_size=bs)
    np.testing.assert_allclose(np.asarray(db.embeddings), np.asarray(fresh.embeddings), rtol=1e-6)
    # a second build with the same key reuses everything
    again = Counting(base)
    db2 = build_database(docs, again, tmp_path, chunk_len=L, batch_size=bs)
    assert again.calls == 0 and db2.path == db.path
    # a different encoder key -> a new database
    other = Counting(histogram_projection_embedder(V, 16, seed=5))
    db3 = build_database(docs, other, tmp_path, chunk_len=L, batch_size=bs)
    assert other.calls == n_batches and db3.path != db.path
    # loadable from its directory
    loaded = load_database(db.path, embed_fn=base)
    assert len(loaded) == n and loaded.chunk_len == L


def test_query_on_the_fly(tmp_path):
    docs = _corpus(seed=3)
    embed = histogram_projection_embedder(V, 32)
    db = build_database(docs, embed, tmp_path, chunk_len=L)
    # a prompt made of two database chunks retrieves them first
    target = [int(np.flatnonzero(db.doc_ids == 4)[0]), int(np.flatnonzero(db.doc_ids == 5)[0])]
    prompt = np.concatenate([db.chunks[t] for t in target])
    ids, toks = query(db, prompt, k=2)
    assert ids.shape == (2, 2) and toks.shape == (2, 2, 2 * L)
    assert ids[:, 0].tolist() == target
    # same as the training neighbours when the chunk's own doc is excluded
    ids2, toks2 = query(db, torch.as_tensor(db.chunks[target]), k=2, exclude_doc_ids=[4, 5])
    ref_ids, ref_toks = neighbours(db, k=2)
    assert (ids2 == ref_ids[target]).all() and (toks2 == np.asarray(ref_toks)[target]).all()


def test_ivf_recall(tmp_path):
    rng = np.random.default_rng(4)
    docs = [rng.integers(1, V, size=int(rng.integers(2, 40)) * L) for _ in range(400)]
    embed = histogram_projection_embedder(V, 32)
    n = chunk_documents(docs, L)[0].shape[0]
    assert n > 4000
    exact = build_database(docs, embed, tmp_path, chunk_len=L, index="flat")
    ivf = build_database(docs, embed, tmp_path, chunk_len=L, ivf_threshold=1000, nlist=32, nprobe=16)
    assert type(ivf.index).__name__ == "IndexIVFFlat" and ivf.path == exact.path
    q = np.arange(0, n, 7)
    ref = neighbours(exact, k=2)[0][q]
    got = neighbours(ivf, k=2)[0][q]
    recall = np.mean([len(set(a) & set(b)) / 2 for a, b in zip(ref, got)])
    assert recall >= 0.9, recall
    assert (ivf.doc_ids[got] != ivf.doc_ids[q][:, None]).all()
    # IVF-PQ path builds and searches
    pq = build_database(docs, embed, tmp_path, chunk_len=L, index="ivf", nlist=16, pq_m=8, nprobe=16)
    assert type(pq.index).__name__ == "IndexIVFPQ"
    assert neighbours(pq, k=2)[0].shape == (n, 2)


@pytest.mark.parametrize("kwargs,field", [
    (dict(chunk_len=0), "chunk_len"),
    (dict(batch_size=0), "batch_size"),
    (dict(metric="cosine"), "metric"),
    (dict(index="hnsw"), "index"),
    (dict(nprobe=0), "nprobe"),
    (dict(nlist=-1), "nlist"),
    (dict(index="ivf", nlist=10**6), "nlist"),
    (dict(index="ivf", nlist=2, pq_m=5), "pq_m"),
])
def test_bad_arguments_name_the_field(tmp_path, kwargs, field):
    docs = [np.arange(1, 40), np.arange(40, 80)]
    with pytest.raises(ValueError, match=field):
        build_database(docs, histogram_projection_embedder(V, 16), tmp_path, **{"chunk_len": L, **kwargs})


def test_bad_search_arguments_name_the_field(tmp_path):
    db = build_database([np.arange(1, 40), np.arange(40, 80)], histogram_projection_embedder(V, 16), tmp_path,
                        chunk_len=L)
    with pytest.raises(ValueError, match="k"):
        neighbours(db, k=0)
    with pytest.raises(ValueError, match="token_chunks"):
        query(db, np.zeros((2, L + 1), dtype=np.int64), k=1)
    with pytest.raises(ValueError, match="documents"):
        build_database([[]], histogram_projection_embedder(V, 16), tmp_path)
    with pytest.raises(ValueError, match="embed_fn"):
        build_database([np.arange(1, 40)], lambda t: torch.zeros(t.shape[0] + 1, 4), tmp_path / "x", chunk_len=L)
    db.embed_fn = None
    with pytest.raises(ValueError, match="embed_fn"):
        query(db, np.zeros((1, L), dtype=np.int64), k=1)


def test_neighbour_ids_alone_then_tokens_from_the_same_search(tmp_path):
    db = build_database(_corpus(), histogram_projection_embedder(V), tmp_path, chunk_len=L, index="flat")
    ids, none = neighbours(db, k=2, tokens=False)
    assert none is None and not list(db.path.glob("neighbours_*_tokens.npy"))
    ids2, toks = neighbours(db, k=2)  # reuses the cached ids, adds the tokens
    assert np.array_equal(ids, ids2) and np.array_equal(toks, db.neighbour_tokens(ids))
