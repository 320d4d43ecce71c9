"""Transformer-XL: relative attention vs its naive formula, the recurrence vs one masked pass, the
contiguous-stream data module, and training / resume / generation end to end (CPU, fp64 where exact)."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from data.streams import StreamDataModule
from kernels.relative_attention import (causal_memory_mask, relative_attention, relative_attention_reference,
                                        relative_scores, relative_scores_reference, sinusoid_distances)
from zoo.models import build_model

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, max_seq_len=16)


def _xl(**kw):
    net = build_model("transformer_xl", **{**TINY, **kw}).double().eval()
    with torch.no_grad():  # the u / v biases start near zero: make their terms count in the comparisons
        for b in net.trunk.blocks:
            b.attn.u.normal_()
            b.attn.v.normal_()
    return net


def _rand_qkv(b=2, h=3, n=7, mem=5, d=8):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, h, mem + n, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, h, mem + n, d, generator=g, dtype=torch.float64)
    u, vb = torch.randn(h, d, generator=g, dtype=torch.float64), torch.randn(h, d, generator=g, dtype=torch.float64)
    return q, k, v, u, vb


# -- the kernel --------------------------------------------------------------------------------

@pytest.mark.parametrize("n, mem", [(7, 5), (1, 9), (6, 0), (4, 11)])
def test_relative_scores_equal_the_naive_construction(n, mem):
    """a+c+b+d with the shift == per pair (q_i + u).k_j + (q_i + v).W R_{i-j}, R built here from scratch."""
    h, d, dm = 3, 8, 10
    q, k, _, u, vb = _rand_qkv(n=n, mem=mem, h=h, d=d)
    w = torch.randn(h * d, dm, dtype=torch.float64)
    klen = mem + n

    def r_of_distance(dist):  # Dai et al.: [sin(d f), cos(d f)], f = 1 / 10000^(2i/dm)
        f = 1.0 / 10000 ** (torch.arange(0, dm, 2, dtype=torch.float64) / dm)
        emb = torch.cat([torch.sin(dist * f), torch.cos(dist * f)])
        return (w @ emb).view(h, d)

    r = (sinusoid_distances(klen, dm, dtype=torch.float64) @ w.T).view(klen, h, d).transpose(0, 1)
    fast = relative_scores(q, k, r, u, vb)
    ref = relative_scores_reference(q, k, r_of_distance, u, vb)
    assert torch.equal(torch.isinf(fast), torch.isinf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(fast[finite], ref[finite], atol=1e-5, rtol=1e-6)  # sinusoids built in float32


@pytest.mark.parametrize("n, mem", [(7, 5), (5, 0), (3, 8)])
def test_relative_attention_and_gradients_equal_the_reference(n, mem):
    q, k, v, u, vb = _rand_qkv(n=n, mem=mem)
    r = torch.randn(q.shape[1], mem + n, q.shape[-1], dtype=torch.float64)
    inputs = [t.clone().requires_grad_() for t in (q, k, v, r, u, vb)]
    fast = relative_attention(*inputs)
    grads = torch.autograd.grad(fast.square().sum(), inputs)
    ref_in = [t.detach().clone().requires_grad_() for t in inputs]
    ref = relative_attention_reference(*ref_in, attn_mask=causal_memory_mask(n, mem))
    ref_grads = torch.autograd.grad(ref.square().sum(), ref_in)
    torch.testing.assert_close(fast, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


# -- the model ---------------------------------------------------------------------------------

def _reference_trunk(trunk, ids, mask):
    """The XL trunk recomputed with the naive attention: one pass over all of `ids` under `mask`."""
    x = trunk.tok_emb(ids)
    n = ids.shape[1]
    pos = sinusoid_distances(n, trunk.cfg.d_model, dtype=x.dtype)
    for blk in trunk.blocks:
        a = blk.attn
        hx = blk.norm1(x)
        b, h, hd = ids.shape[0], a.n_heads, a.head_dim
        q, k, v = (t.view(b, n, h, hd).transpose(1, 2) for t in a.qkv(hx).split(h * hd, dim=-1))
        r = a.r_net(pos).view(n, h, hd).transpose(0, 1)
        y = relative_attention_reference(q, k, v, r, a.u, a.v, attn_mask=mask)
        x = x + a.out(y.transpose(1, 2).reshape(b, n, h * hd))
        x = x + blk.ffn(blk.norm2(x))
    return trunk.norm(x)


def test_mem_len_0_is_a_plain_causal_decoder_with_relative_attention():
    net = _xl(mem_len=0)
    ids = torch.randint(0, 64, (2, 24))
    memory = net.trunk.new_memory()
    first = net.trunk(ids[:, :12], cache=memory)
    second = net.trunk(ids[:, 12:], cache=memory)
    assert len(memory) == 0  # nothing is carried
    for seg, out in ((ids[:, :12], first), (ids[:, 12:], second)):
        ref = _reference_trunk(net.trunk, seg, causal_memory_mask(12, 0))
        torch.testing.assert_close(out, ref)


@pytest.mark.parametrize("seg, mem_len", [(8, 8), (8, 5), (6, 13), (7, 20)])
def test_segment_recurrence_equals_one_pass_with_the_matching_mask(seg, mem_len):
    """Segment by segment with memory == one pass over the whole sequence where query t sees keys
    max(0, segment_start(t) - mem_len) ... t (lengths that are not multiples of the segment included)."""
    net = _xl(mem_len=mem_len)
    total = 3 * seg + 3
    ids = torch.randint(0, 64, (2, total))
    memory = net.trunk.new_memory()
    outs = [net.trunk(ids[:, s: s + seg], cache=memory) for s in range(0, total, seg)]
    t = torch.arange(total)
    lo = (t // seg * seg - mem_len).clamp(min=0)
    mask = (t[None] <= t[:, None]) & (t[None] >= lo[:, None])
    one_pass = net.trunk(ids, segment_mask=mask)
    torch.testing.assert_close(torch.cat(outs, dim=1), one_pass)
    torch.testing.assert_close(one_pass, _reference_trunk(net.trunk, ids, mask))
    assert len(memory) == min(mem_len, total)


def test_memory_stops_gradients_and_training_steps_backprop_within_the_segment():
    net = build_model("transformer_xl", **TINY, mem_len=8).train()
    memory = net.trunk.new_memory()
    net(torch.randint(0, 64, (2, 8)), cache=memory)
    assert all(not m.requires_grad for m in memory.layers)
    loss = net(torch.randint(0, 64, (2, 8)), cache=memory).logsumexp(-1).mean()
    loss.backward()
    assert all(p.grad is not None for n, p in net.named_parameters() if ".attn." in n)


def test_generation_with_memory_equals_recomputing_the_context():
    net = build_model("transformer_xl", **{**TINY, "max_seq_len": 32}, mem_len=4).eval()
    prompt = torch.randint(0, 64, (2, 5))
    with_memory = net.generate(prompt, 20, temperature=0, use_cache=True)
    recompute = net.generate(prompt, 20, temperature=0, use_cache=False)
    assert torch.equal(with_memory, recompute)
    # beyond max_seq_len the memory slides on (no window restart): it still decodes, one token a step
    assert net.generate(prompt, 40, temperature=0).shape == (2, 45)


@pytest.mark.parametrize("overrides, match", [
    ({"recurrence": "lstm"}, "model.recurrence='lstm'; valid choices: none, xl"),
    ({"position": "learned"}, "model.recurrence=xl needs model.position='none'"),
    ({"mem_len": -1}, "model.mem_len must be an integer >= 0"),
    ({"attention": {"core": "sliding_window"}}, "valid choices: causal"),
])
def test_bad_xl_fields_are_named(overrides, match):
    with pytest.raises(ValueError, match=match):
        build_model("transformer_xl", **TINY, **overrides)


# -- the data module ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("streams")
    (root / "docs").mkdir()
    for d in range(20):  # a folder of documents: some land in the validation split
        (root / "docs" / f"doc{d:02d}.txt").write_text(
            "".join(f"doc {d} line {i}: {'abcdefghij'[i % 10] * (i % 7)}\n" for i in range(30)))
    return root


def _dm(corpus, rank=0, world=1, **kw):
    dm = StreamDataModule(source=str(corpus / "docs"), seq_len=kw.pop("seq_len", 16), batch_size=3,
                          val_percent=20.0, cache_dir=str(corpus / "cache"), **kw)
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, training=True)  # what the data module reads
    dm.setup()
    return dm


def _epoch(loader, sampler, epoch):
    sampler.set_epoch(epoch)
    return list(loader)


def test_streams_reassemble_into_the_corpus_in_order_across_batches_and_epochs(corpus):
    dm = _dm(corpus)
    tokens = np.asarray(dm.token_streams()[0], dtype=np.int64)
    loader = dm.train_dataloader()
    ds, sampler = dm.train_set, dm._train_sampler
    part, n_seg = ds.part_len, ds.n_segments
    assert part == (len(tokens) - 1) // 3 and n_seg == part // 16 and n_seg > 2
    for epoch in range(2):
        batches = _epoch(loader, sampler, epoch)
        assert len(batches) == n_seg
        assert [bool(b["reset"].all()) for b in batches] == [True] + [False] * (n_seg - 1)
        assert [int(b["batch_number"][0]) for b in batches] == list(range(n_seg))
        inputs = torch.cat([b["input_ids"] for b in batches], dim=1)
        labels = torch.cat([b["labels"] for b in batches], dim=1)
        for row in range(3):
            want = tokens[row * part: row * part + n_seg * 16 + 1]
            assert inputs[row].tolist() == want[:-1].tolist()
            assert labels[row].tolist() == want[1:].tolist()


def test_each_rank_reads_its_own_contiguous_streams(corpus):
    tokens = np.asarray(_dm(corpus).token_streams()[0], dtype=np.int64)
    firsts = []
    for rank in range(2):
        dm = _dm(corpus, rank=rank, world=2)
        part = dm.train_set.part_len
        assert part == (len(tokens) - 1) // 6
        batch = next(iter(dm.train_dataloader()))
        for row in range(3):
            start = (rank * 3 + row) * part
            assert batch["input_ids"][row].tolist() == tokens[start: start + 16].tolist()
            firsts.append(start)
    assert sorted(firsts) == [i * part for i in range(6)]  # six disjoint streams, no rank shares one


def test_resume_continues_the_streams_where_they_were(corpus):
    dm = _dm(corpus)
    loader = dm.train_dataloader()
    full = _epoch(loader, dm._train_sampler, 1)
    # an interrupted run: trained on 3 batches of epoch 1 (the data module records it as they arrive)
    it = iter(loader)
    for _ in range(3):
        dm.on_before_batch_transfer(next(it), 0)
    state = loader.state_dict()
    assert state == {"epoch": 1, "consumed": 3}
    fresh = _dm(corpus)
    resumed_loader = fresh.train_dataloader()
    resumed_loader.load_state_dict(state)
    fresh._train_sampler.set_epoch(1)
    rest = list(resumed_loader)
    assert len(rest) == len(full) - 3
    for a, b in zip(rest, full[3:]):
        assert torch.equal(a["input_ids"], b["input_ids"]) and not bool(a["reset"].any())


# -- end to end --------------------------------------------------------------------------------

def _train(tmp_path, *overrides, callbacks=None):
    import train as train_script
    from helpers import make_cfg

    cfg = make_cfg(tmp_path, "model=transformer_xl", "logger=csv", "model.mem_len=32", "model.eval_mem_len=96",
                   "data.seq_len=32", "trainer.val_check_interval=4", *overrides)
    if callbacks:
        with open_dict(cfg):
            cfg.callbacks.update(callbacks)
    return train_script.train(cfg)


def _weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


def test_smoke_trains_carries_memory_and_resumes_exactly(tmp_path):
    """debug=smoke trains model=transformer_xl on streams; the memory survives across batches into the
    checkpoint; 8 steps straight == 4 steps, stop, resume, 4 more (streams and memory continue)."""
    metrics = _train(tmp_path / "straight", "trainer.max_steps=8")
    assert metrics["global_step"] == 8 and math.isfinite(metrics["val/loss"])
    ckpt = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    mem = ckpt["xl_memory"]
    assert mem["mem_len"] == 32 and len(mem["layers"]) == 2 and mem["layers"][0].shape == (8, 32, 64)
    _train(tmp_path / "first", "trainer.max_steps=8", callbacks={"stop": {"_target_": "helpers.StopAtStep", "step": 4}})
    first = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(first, weights_only=True)["global_step"] == 4
    _train(tmp_path / "resumed", "trainer.max_steps=8", f"ckpt_path={first}")
    a, b = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt"), _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_the_xl_task_drops_the_memory_where_streams_restart():
    from zoo.tasks.xl import TransformerXLLM

    task = TransformerXLLM(model=build_model("transformer_xl", **TINY, mem_len=8).cfg.to_dict())
    ids = torch.randint(0, 64, (2, 9))
    batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous(), "reset": torch.tensor([True, True])}
    task._xl_loss(batch, task.train_memory)
    assert len(task.train_memory) == 8
    loss_after_reset, _ = task._xl_loss(batch, task.train_memory)  # reset: same loss as with no memory
    no_memory = F.cross_entropy(task.net(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(loss_after_reset, no_memory)
    carried, _ = task._xl_loss({**batch, "reset": torch.tensor([False, False])}, task.train_memory)
    assert not torch.allclose(carried, no_memory)
    with pytest.raises(ValueError, match="some batch rows only"):
        task._xl_loss({**batch, "reset": torch.tensor([True, False])}, task.train_memory)


def test_evaluation_with_a_longer_memory_than_training_sees_the_whole_context():
    """A model trained with mem_len=4 evaluated with a memory covering the stream == one causal pass over
    it; a memory of 0 == scoring each segment alone."""
    from zoo.models.transformer_xl import stream_loss

    net = _xl(mem_len=4)
    ids = torch.randint(0, 64, (2, 33))
    full = F.cross_entropy(net(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).item()
    assert stream_loss(net, ids, seg_len=8, mem_len=64) == pytest.approx(full, rel=1e-9)
    alone = [F.cross_entropy(net(ids[:, s: s + 8]).flatten(0, 1), ids[:, s + 1: s + 9].flatten(), reduction="sum")
             for s in range(0, 32, 8)]
    assert stream_loss(net, ids, seg_len=8, mem_len=0) == pytest.approx(float(sum(alone)) / 64, rel=1e-9)
    assert stream_loss(net, ids, seg_len=8, mem_len=8) != pytest.approx(full, rel=1e-6)
