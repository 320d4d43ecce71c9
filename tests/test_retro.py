"""RETRO: causality of chunked cross-attention, equality with the plain decoder, the data stage, training."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.models import build_model
from zoo.models.retro import ChunkNeighbours, frozen_bert_embedder

V, M = 61, 8  # vocabulary, chunk length
SIZES = dict(vocab_size=V, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, position="rope", chunk_len=M)


def retro(**kw):
    return build_model("gpt", **{**SIZES, "retrieval": True, "cca_layers": [1, 3], **kw}).eval()


def inputs(b=2, l=4, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (b, l * M), generator=g)
    nb = torch.randint(0, V, (b, l, k, 2 * M), generator=g)
    return x, nb


@pytest.mark.parametrize("i", [0, 1, 2])
def test_chunk_i_never_sees_chunk_i_plus_1_or_later(i):
    """Changing the tokens of chunk i+1 onwards and every neighbour retrieved from them leaves the outputs of
    chunk i (positions < (i + 1) * M) unchanged, with retrieval on."""
    net = retro()
    x, nb = inputs()
    x2, nb2 = x.clone(), nb.clone()
    x2[:, (i + 1) * M:] = (x2[:, (i + 1) * M:] + 7) % V
    nb2[:, i + 1:] = (nb2[:, i + 1:] + 5) % V
    with torch.no_grad():
        y, y2 = net(x, neighbours=nb), net(x2, neighbours=nb2)
    end = (i + 1) * M
    torch.testing.assert_close(y[:, :end], y2[:, :end], rtol=0, atol=1e-6)
    assert (y[:, end:] - y2[:, end:]).abs().max() > 1e-4


@pytest.mark.parametrize("u", [0, 2])
def test_causal_offset_first_reader_is_the_last_token_of_the_chunk(u):
    """Neighbours of chunk u reach position (u + 1) * M - 1 first (the chunk is complete there), none before."""
    net = retro()
    x, nb = inputs()
    nb2 = nb.clone()
    nb2[:, u] = (nb2[:, u] + 3) % V
    with torch.no_grad():
        diff = (net(x, neighbours=nb) - net(x, neighbours=nb2)).abs().amax(dim=(0, 2))
    first = (u + 1) * M - 1
    assert diff[:first].max() == 0
    assert diff[first] > 1e-5


def test_without_neighbours_it_is_the_plain_decoder():
    """No neighbours (None, or all of them padding) gives exactly the decoder-only counterpart, which is the
    same weights in a model built with retrieval=false (no encoder, no CCA)."""
    net = retro()
    plain = build_model("gpt", **SIZES).eval()
    missing, unexpected = plain.load_state_dict(net.state_dict(), strict=False)
    assert not missing and all(k.startswith("trunk.encoder.") or ".cross." in k for k in unexpected)
    x, nb = inputs()
    with torch.no_grad():
        ref = plain(x)
        torch.testing.assert_close(net(x), ref, rtol=0, atol=0)
        none_found = torch.zeros_like(nb, dtype=torch.bool)
        torch.testing.assert_close(net(x, neighbours=nb, neighbour_mask=none_found), ref, rtol=0, atol=1e-6)
        assert (net(x, neighbours=nb) - ref).abs().max() > 1e-4


def test_masked_neighbour_tokens_are_not_read():
    net = retro()
    x, nb = inputs()
    mask = torch.ones_like(nb, dtype=torch.bool)
    mask[:, :, 1, M:] = False  # the second neighbour has no continuation
    nb2 = nb.clone()
    nb2[:, :, 1, M:] = (nb2[:, :, 1, M:] + 1) % V
    with torch.no_grad():
        torch.testing.assert_close(net(x, neighbours=nb, neighbour_mask=mask),
                                   net(x, neighbours=nb2, neighbour_mask=mask), rtol=0, atol=1e-6)


def test_gradients_reach_encoder_and_cca_and_errors_name_the_field():
    net = retro().train()
    x, nb = inputs()
    net(x, neighbours=nb).sum().backward()
    assert net.trunk.encoder.blocks[0].cross.q.weight.grad.abs().sum() > 0
    assert net.trunk.blocks[3].cross.kv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="model.retrieval=false"):
        build_model("gpt", **SIZES)(x, neighbours=nb)
    with pytest.raises(ValueError, match="model.cca_layers"):
        build_model("gpt", **{**SIZES, "retrieval": True, "cca_layers": [4]})
    with pytest.raises(ValueError, match="model.arch='decoder'"):
        build_model("bert", **{**SIZES, "retrieval": True})
    with pytest.raises(ValueError, match="neighbours must be"):
        net(x, neighbours=nb[0])


def test_generation_retrieves_each_completed_chunk_once():
    net = retro()
    calls = []

    def retrieve(chunks):
        calls.append(chunks.shape[0])
        g = torch.Generator().manual_seed(int(chunks.sum()))
        return torch.randint(0, V, (chunks.shape[0], 2, 2 * M), generator=g), torch.ones(chunks.shape[0], 2, 2 * M,
                                                                                        dtype=torch.bool)

    prompt = torch.randint(0, V, (1, 3))
    out = net.generate(prompt, 30, temperature=0, retrieve=retrieve)
    assert out.shape == (1, 33) and sum(calls) == 33 // M
    # the same continuation, step by step, as a full recompute with the same neighbours
    nbs = ChunkNeighbours(retrieve, M)
    ctx, kw = nbs(out[:, :-1], 64)
    with torch.no_grad():
        assert net(ctx, **kw)[0, -1].argmax() == out[0, -1]


def test_frozen_bert_embedder_is_deterministic_and_ignores_padding():
    with pytest.warns(UserWarning, match="random-init"):
        e1 = frozen_bert_embedder(vocab_size=64, pad_id=0)
    with pytest.warns(UserWarning):
        e2 = frozen_bert_embedder(vocab_size=64, pad_id=0)
    t = torch.randint(1, 64, (3, M))
    torch.testing.assert_close(e1(t), e2(t))
    assert e1(t).shape == (3, 256) and e1.__qualname__ == e2.__qualname__


# -- the data stage -------------------------------------------------------------------------------------

faiss = pytest.importorskip("faiss")  # noqa: E402  (the GPU image has no faiss: the data tests skip there)

from data.retro import _ChunkedSequences, chunk_overlap, split_documents  # noqa: E402


def test_split_documents_and_chunked_sequences():
    stream = np.array([5, 6, 7, 9, 1, 2, 9, 3, 9])  # 9 = <eos>
    docs = split_documents(stream, 9)
    assert [d.tolist() for d in docs] == [[5, 6, 7, 9], [1, 2, 9], [3, 9]]
    chunks = np.array([[5, 6, 7], [9, 0, 0], [1, 2, 9], [3, 9, 0]])  # pad = 0
    ds = _ChunkedSequences(chunks, pad_id=0, n_chunks=2, neighbours=np.arange(4 * 2 * 6).reshape(4, 2, 6),
                           overlap=np.array([0.1, 0.9, 0.2, 0.3], dtype=np.float32))
    assert len(ds) == 1  # 12 tokens: one sequence of 6 and its next token
    item = ds[(0, 0, 0)]
    assert item["input_ids"].tolist() == [5, 6, 7, 9, 0, 0]
    assert item["labels"].tolist() == [6, 7, 9, -100, -100, 1]
    assert item["neighbours"].shape == (2, 2, 6) and item["chunk_overlap"].tolist() == pytest.approx([0.0, 0.9])


def test_chunk_overlap_counts_ngrams_seen_in_the_previous_chunks_neighbours():
    chunks = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12]])
    prev = np.zeros((2, 2, 8), dtype=np.int64)
    prev[0, 0, :6] = [1, 2, 3, 4, 5, 6]  # a copy of chunk 0: all 3 trigrams
    prev[1, 1, :4] = [7, 8, 9, 99]  # only the trigram 7 8 9 of chunk 1's four
    assert chunk_overlap(chunks, prev, n=3, pad_id=0).tolist() == pytest.approx([1.0, 0.25])


def test_retro_data_module_on_a_tiny_corpus(tmp_path):
    from data.retro import RetroDataModule

    src = tmp_path / "corpus"
    src.mkdir()
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    for i in range(12):
        (src / f"doc{i}.txt").write_text(" ".join(rng.choice(words, 300)))
    kw = dict(source=str(src), chunk_len=16, k=2, seq_len=64, batch_size=2, cache_dir=str(tmp_path / "cache"),
              val_percent=20.0)
    dm = RetroDataModule(**kw)
    dm.prepare_data()
    dm.setup()
    item = dm.train_set[(0, 1, 0)]
    assert item["neighbours"].shape == (4, 2, 32) and item["neighbour_mask"].dtype == torch.bool
    ids = dm.database()
    # no chunk's neighbours come from its own document
    from data.retrieval import neighbours
    nb_ids, _ = neighbours(ids, 2)
    assert (ids.doc_ids[nb_ids[nb_ids >= 0]] != np.repeat(ids.doc_ids, 2)[(nb_ids >= 0).ravel()]).all()
    assert 0.0 <= dm.near_dup_fraction <= 1.0 and "chunk_overlap" in dm.val_set[(0, 0, 0)]
    # the batches gather the neighbours' tokens from the cached ids: the same as the database's own tokens
    _, toks = neighbours(ids, 2)
    assert np.array_equal(item["neighbours"].numpy(), toks[4:8])
    assert not list(ids.path.glob("val_*_tokens.npy"))
    off = RetroDataModule(**kw, retrieve=False)
    off.setup()
    assert "neighbours" not in off.train_set[(0, 1, 0)]
    assert torch.equal(off.train_set[(0, 1, 0)]["input_ids"], item["input_ids"])  # the same sequences
    with pytest.raises(ValueError, match="data.seq_len=60 must be a multiple of data.chunk_len=16"):
        RetroDataModule(**{**kw, "seq_len": 60})


@pytest.mark.parametrize("retrieval", [True, False])
def test_debug_smoke_builds_a_tiny_database_and_trains(tmp_path, retrieval):
    import sys

    from helpers import ROOT, make_cfg

    sys.path.insert(0, str(ROOT))
    import train as train_script

    cfg = make_cfg(tmp_path, "model=retro", f"model.retrieval={str(retrieval).lower()}", "logger=csv")
    assert cfg.data.max_docs == 40 and cfg.data.chunk_len == 16 and cfg.data.retrieve == retrieval
    metrics = train_script.train(cfg)
    assert metrics["global_step"] == 20
    for key in ("val/bpb", "val/bpb_novel", "val/near_dup_frac"):
        assert np.isfinite(metrics[key]), key
    assert metrics["val/loss"] < np.log(cfg.model.vocab_size)  # learned something in 20 steps
    import zoo  # the checkpoint rebuilds the same model, retrieval and all

    net, mcfg = zoo.load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert mcfg.retrieval == retrieval and mcfg.chunk_len == 16
    x = torch.randint(0, 256, (1, 64))
    kw = {"neighbours": torch.randint(0, 256, (1, 4, 2, 32))} if retrieval else {}
    assert net(x, **kw).shape == (1, 64, mcfg.vocab_size)


def test_the_retriever_is_a_config_group(tmp_path):
    from helpers import make_cfg

    assert make_cfg(tmp_path, "model=retro").data.embedder._target_.endswith("histogram_projection_embedder")
    cfg = make_cfg(tmp_path, "model=retro", "retro_embedder=bert", "data.embedder.ckpt=/some/bert.ckpt")
    assert cfg.data.embedder._target_ == "zoo.models.retro.frozen_bert_embedder"
    assert cfg.data.embedder.ckpt == "/some/bert.ckpt"
    # the GPT arm of experiment=retro_gain reads the same data with the same retriever
    gpt = make_cfg(tmp_path, "model=gpt", "data=retro")
    assert gpt.data._target_ == "data.retro.RetroDataModule" and not gpt.data.retrieve
