"""LRA ListOps and Pathfinder-32: the generators, the data module's cache, and smoke runs of the experiments."""
from __future__ import annotations

import json
import sys
from collections import deque
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import data.lra as lra
from data.lra import LRADataModule, evaluate_listops, generate_listops, generate_pathfinder, pathfinder_example
from tests.helpers import make_cfg

SMALL = dict(num_train=64, num_val=16, num_test=8, batch_size=8)


# -- ListOps ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("expr,value", [
    ("7", 7),
    ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9),
    ("[MIN 4 7 ]", 4),
    ("[MED 1 5 3 ]", 3),
    ("[MED 1 2 ]", 1),               # median 1.5, truncated as LRA's int(np.median(...))
    ("[MED 3 4 8 9 ]", 6),           # (4 + 8) / 2
    ("[SM 4 5 3 ]", 2),              # 12 mod 10
    ("[SM 9 9 9 9 ]", 6),
    ("[MAX [MIN 9 8 ] [SM 5 5 ] [MED 2 2 7 ] ]", 8),
    ("[SM [MAX 1 [MIN 3 [MED 9 9 9 ] ] ] 4 ]", 7),
])
def test_listops_evaluator(expr, value):
    assert evaluate_listops(expr) == value
    assert evaluate_listops(expr.split()) == value


@pytest.mark.parametrize("bad", ["[MAX 1 2", "]", "1 2", "[FOO 1 ]", "[MAX ]", "12"])
def test_listops_evaluator_rejects_malformed(bad):
    with pytest.raises(ValueError):
        evaluate_listops(bad)


def test_listops_generator():
    kw = dict(min_len=10, max_len=60, seed=3)
    exprs, labels = generate_listops(400, **kw)
    again, labels2 = generate_listops(400, **kw)
    assert exprs == again and labels == labels2  # deterministic
    assert generate_listops(50, min_len=10, max_len=60, seed=4)[0] != exprs[:50]
    assert all(10 <= len(e) <= 60 for e in exprs)
    assert len({" ".join(e) for e in exprs}) == len(exprs)  # deduplicated
    assert all(evaluate_listops(e) == y for e, y in zip(exprs, labels))
    assert set(labels) == set(range(10))
    assert all(t in lra.LISTOPS_IDS for e in exprs for t in e)
    # depth never exceeds max_depth, arguments per operator within 2..max_args
    for e in exprs[:100]:
        depth, counts = 0, []
        for t in e:
            if t in lra.OPERATORS:
                depth += 1
                counts.append(0)
                assert depth <= 10
            elif t == "]":
                depth -= 1
                assert 2 <= counts.pop() <= 10
                if counts:
                    counts[-1] += 1
            elif counts:
                counts[-1] += 1


def test_listops_lra_lengths():
    exprs, _ = generate_listops(20, seed=0)  # LRA's defaults: 500-2000 tokens
    assert all(500 <= len(e) <= 2000 for e in exprs)


# -- Pathfinder ------------------------------------------------------------------------------------------------
def _reachable(img: np.ndarray, a, b) -> bool:
    lit = img > 0
    seen, todo = {a}, deque([a])
    while todo:
        y, x = todo.popleft()
        if (y, x) == b:
            return True
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                p = (y + dy, x + dx)
                if 0 <= p[0] < img.shape[0] and 0 <= p[1] < img.shape[1] and lit[p] and p not in seen:
                    seen.add(p)
                    todo.append(p)
    return False


def test_pathfinder_generator():
    images, labels = generate_pathfinder(200, seed=5)
    again, labels2 = generate_pathfinder(200, seed=5)
    assert np.array_equal(images, again) and np.array_equal(labels, labels2)
    assert not np.array_equal(generate_pathfinder(20, seed=6)[0], images[:20])
    assert images.shape == (200, 1024) and images.dtype == np.uint8
    assert labels.sum() == 100  # balanced
    assert ((images == 255).sum(1) >= 18).all()  # two 3x3 markers in every image
    assert ((images > 0) & (images < 255)).any(1).all()  # dashes drawn


def test_pathfinder_images_do_not_depend_on_the_worker_count(monkeypatch):
    monkeypatch.setattr(lra, "PATHFINDER_SHARD", 7)  # 30 images: five shards, the last one short
    one, labels = generate_pathfinder(30, seed=3, workers=1)
    three, labels3 = generate_pathfinder(30, seed=3, workers=3)
    assert np.array_equal(one, three) and np.array_equal(labels, labels3)
    assert labels.sum() == 15 and len({img.tobytes() for img in one}) == 30


def test_pathfinder_splits_in_one_pool_are_the_splits_drawn_alone(monkeypatch):
    """The data module draws every split's shards in one pool: the same images as one split at a time."""
    monkeypatch.setattr(lra, "PATHFINDER_SHARD", 7)
    splits = [(30, 3), (9, 4), (5, 5)]
    pooled = lra.generate_pathfinder_splits(splits, workers=3)
    for (n, seed), (images, labels) in zip(splits, pooled):
        alone = generate_pathfinder(n, seed=seed)
        assert np.array_equal(images, alone[0]) and np.array_equal(labels, alone[1])


def test_pathfinder_connectivity_is_exact_with_solid_contours():
    # gap=0: solid contours, broken only by the cut; objects never touch, so the label is exactly flood-fill
    # reachability (a cut through the marked contour separates its ends; one through the other does not join them)
    rng = np.random.default_rng(0)
    checked = {True: 0, False: 0}
    for i in range(600):  # about 1 layout in 9 fits (the gaps' margin to the markers rejects most)
        connected = i % 2 == 0
        ex = pathfinder_example(rng, connected, gap=0)
        if ex is None:
            continue
        img, (a, b) = ex
        assert img[a] == 255 and img[b] == 255
        assert _reachable(img, a, b) == connected
        checked[connected] += 1
    assert checked[True] > 20 and checked[False] > 20


# -- data module -----------------------------------------------------------------------------------------------
def test_listops_module_and_cache(tmp_path, monkeypatch):
    dm = LRADataModule(task="listops", seq_len=41, min_len=5, max_len=40, cache_dir=str(tmp_path), **SMALL)
    dm.setup()
    assert dm.vocab_size >= len(lra.LISTOPS_VOCAB) and dm.num_labels == 10
    assert len(dm.train_set) == 64 and len(dm.val_set) == 16 and len(dm.test_set) == 8
    batch = dm.on_before_batch_transfer(next(iter(dm.train_dataloader())), 0)
    assert batch["input_ids"].shape == (8, 41) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].shape == (8, 41) and batch["labels"].shape == (8,)
    assert (batch["input_ids"][:, 0] == lra.CLS_ID).all()
    assert ((batch["input_ids"] == lra.PAD_ID) == (batch["attention_mask"] == 0)).all()
    # the served ids decode back to expressions whose value is the label
    inv = {i: t for t, i in lra.LISTOPS_IDS.items()}
    for ids, mask, y in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        toks = [inv[int(i)] for i in ids[1 : int(mask.sum())]]
        assert evaluate_listops(toks) == int(y)
    # no expression in two splits
    key = lambda s: {tuple(x.tolist()) for x in s.seqs}  # noqa: E731
    assert not key(dm.train_set) & key(dm.val_set) and not key(dm.train_set) & key(dm.test_set)
    params = json.loads((dm.cache_path() / "params.json").read_text())
    assert params["max_len"] == 40 and params["task"] == "listops"

    # a second build loads the cache, offline, without generating
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(lra, "generate_listops", lambda *a, **k: (_ for _ in ()).throw(AssertionError("regenerated")))
    dm2 = LRADataModule(task="listops", seq_len=41, min_len=5, max_len=40, cache_dir=str(tmp_path), **SMALL)
    dm2.setup()
    assert [x.tolist() for x in dm2.train_set.seqs] == [x.tolist() for x in dm.train_set.seqs]
    # other generation parameters are another cache entry
    dm3 = LRADataModule(task="listops", seq_len=41, min_len=5, max_len=30, cache_dir=str(tmp_path), **SMALL)
    assert dm3.cache_path() != dm.cache_path()
    with pytest.raises(AssertionError, match="regenerated"):
        dm3.setup()


def test_jobs_started_together_generate_the_data_once(tmp_path, monkeypatch):
    """A sweep's jobs all call prepare_data at once: one generates, the others wait for its cache entry."""
    import threading
    import time

    calls = []
    real = LRADataModule.generate

    def slow_generate(self):
        calls.append(1)
        time.sleep(0.5)
        return real(self)
    monkeypatch.setattr(LRADataModule, "generate", slow_generate)
    modules = [LRADataModule(task="listops", seq_len=41, min_len=5, max_len=40, cache_dir=str(tmp_path), **SMALL)
               for _ in range(3)]
    threads = [threading.Thread(target=m.prepare_data) for m in modules]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [1] and (modules[0].cache_path() / "done").exists()
    modules[2].setup()
    assert len(modules[2].train_set) == 64


def test_pathfinder_module_and_cache(tmp_path, monkeypatch):
    dm = LRADataModule(task="pathfinder", seq_len=1025, cache_dir=str(tmp_path), **SMALL)
    dm.setup()
    assert dm.num_labels == 2 and dm.vocab_size >= 258
    batch = dm.on_before_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert batch["input_ids"].shape == (8, 1025) and batch["attention_mask"].all()
    assert batch["input_ids"][:, 1:].min() >= 2 and batch["input_ids"][:, 1:].max() <= 257
    assert dm.train_set.labels.sum() == 32
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(lra, "generate_pathfinder_splits",
                        lambda *a, **k: (_ for _ in ()).throw(AssertionError("regen")))
    dm2 = LRADataModule(task="pathfinder", seq_len=1025, cache_dir=str(tmp_path), **SMALL)
    dm2.setup()
    assert np.array_equal(dm2.train_set.seqs, dm.train_set.seqs)


def test_listops_fits_a_short_model(tmp_path):
    dm = LRADataModule(task="listops", seq_len=64, cache_dir=str(tmp_path), **SMALL)  # LRA's 500-2000 by default
    assert dm.listops["max_len"] == 63 and dm.listops["min_len"] == 31


def test_module_checks_sizes(tmp_path):
    with pytest.raises(ValueError, match="too short"):
        LRADataModule(task="pathfinder", seq_len=64, cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="task"):
        LRADataModule(task="text", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="classes"):
        LRADataModule(task="listops", num_classes=8, cache_dir=str(tmp_path))


# -- experiments -----------------------------------------------------------------------------------------------
TINY = ["data.num_train=64", "data.num_val=16", "data.num_test=8", "trainer.max_steps=6",
        "trainer.val_check_interval=3"]


@pytest.mark.parametrize("experiment,extra", [
    ("lra_listops", []),                          # smoke's 64 positions: expressions of <= 63 tokens
    ("lra_listops", ["data.min_len=5", "data.max_len=40"]),
    ("lra_pathfinder", []),                       # rope: 1025 tokens through smoke's max_seq_len=64
    ("lra_pathfinder", ["attention=lsh", "model.shared_qk=true"]),  # the Reformer arm, outside the sweep list
])
def test_experiment_smoke(tmp_path, experiment, extra):
    import train

    cfg = make_cfg(tmp_path, f"experiment={experiment}", f"paths.cache_dir={tmp_path / 'cache'}", *TINY, *extra)
    assert cfg.task._target_ == "zoo.tasks.SequenceClassification" and cfg.logger.csv
    assert cfg.task.num_labels == (10 if experiment == "lra_listops" else 2)
    # LRA's heads: <cls> on ListOps, the mean over the pixels on Pathfinder
    assert (OmegaConf.select(cfg, "model.pool") or "cls") == ("cls" if experiment == "lra_listops" else "mean")  # null: cls
    assert cfg.model.attention.redraw_interval == 0  # a Performer arm keeps its features, as LRA's
    metrics = train.train(cfg)
    assert metrics["global_step"] == 6
    assert 0.0 <= metrics["val/acc"] <= 1.0
    assert 0.0 <= metrics["test/acc"] <= 1.0 and metrics["test/loss"] > 0  # the experiments score the test split
    assert json.loads((tmp_path / "metrics.json").read_text())["test/acc"] == metrics["test/acc"]
    assert list(tmp_path.glob("csv/**/metrics.csv"))


@pytest.mark.parametrize("overrides,match", [
    (["data.num_test=0"], "data.num_test=0"),
    (["data=stdlib", "task=causal_lm", "model=gpt"], "has no test split"),
])
def test_test_split_is_checked_before_training(tmp_path, overrides, match):
    import train

    cfg = make_cfg(tmp_path, "experiment=lra_listops", f"paths.cache_dir={tmp_path / 'cache'}", *overrides)
    with pytest.raises(ValueError, match=match):
        train.train(cfg)
    assert not (tmp_path / "cache").exists()  # refused before any data was generated


@pytest.mark.parametrize("experiment", ["lra_listops", "lra_pathfinder"])
@pytest.mark.parametrize("core", ["full", "sliding_window", "longformer", "bigbird", "performer", "linear"])
def test_every_swept_core_trains(tmp_path, experiment, core):
    import train

    cfg = make_cfg(tmp_path, f"experiment={experiment}", f"attention={core}", f"paths.cache_dir={tmp_path / 'cache'}",
                   "data.num_train=32", "data.num_val=8", "data.num_test=0", "test=false", "trainer.max_steps=2",
                   "trainer.val_check_interval=2", "model.d_model=32", "model.n_heads=2")
    assert train.train(cfg)["global_step"] == 2


def test_lra_baselines_cnn_receptive_fields():
    """scripts/lra_baselines.py's two Pathfinder CNNs see what their docstring says: before the max over positions,
    the local one's feature at a pixel depends on the 7 x 7 pixels around it only; the whole-image one's on pixels
    more than 16 apart (so the markers of any image can meet)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import lra_baselines

    def support(trunk, at):
        x = torch.randn(1, 1, 32, 32, requires_grad=True)
        f = trunk(x)
        f[0, :, at, at].sum().backward()
        rows, cols = (x.grad[0, 0].abs() > 0).nonzero(as_tuple=True)
        return int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)

    models = lra_baselines.cnn_models()
    for m in models.values():
        m.eval()  # batch statistics would couple the pixels
    assert support(models["local_7px"][:-3], 16) == (7, 7)
    assert min(support(models["whole_image"][:-3], 2)) > 16


def test_lra_baselines_script():
    """scripts/lra_baselines.py: the one-cue rules docs/lra.md quotes (here at small sizes), fitted on one set and
    scored on another."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import lra_baselines

    out = lra_baselines.main(["train=400", "val=300", "pathfinder=1000"])
    assert "pathfinder_cnn" not in out  # the CNNs train only when asked (cnn=N)
    lo = out["listops"]
    assert lo["rule"]["[MIN"] == 0 and lo["rule"]["[MAX"] == 9
    assert lo["outermost_operator"] > lo["majority_class"] + 0.1
    # both classes mark the ends of one contour: the markers' distance says nothing about the label
    assert out["pathfinder"]["marker_distance_threshold"] < 0.56
