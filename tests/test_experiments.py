"""Every experiment config (conf/experiment/*.yaml) trains a few tiny steps through train.py, and so does every arm
of its sweep, so that none of them rots.

An experiment's sweep is its hydra.sweeper.params. Keys that pick a config (attention=..., moe_vs_dense=...,
retro_arm=...) are run once per value, the other keys at the experiment's own values; keys that set a size
(model.d_model, data.num_kv_pairs, data.k) are not: CI shrinks every size (debug=smoke: 2 layers x 64, 64 tokens,
batch 8) and a sweep's sizes are chosen for the real length (MQAR's 64 pairs need 256 tokens). All data is made
on the machine (the stdlib corpus, MQAR, LRA ListOps/Pathfinder (small CPU sets, cached), duplication, streams):
nothing needs a download. Runs marked `slow` (ids ending in -slow) take 2 s or more on the 2-core CI machine;
the whole file takes about a minute there.
"""
from __future__ import annotations

import json
import math
import sys
import tempfile

import pytest

from helpers import ROOT, make_cfg

sys.path.insert(0, str(ROOT / "scripts"))
import train as train_script  # noqa: E402

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))
# on CPU: no compile (12 s a graph) and fp32, whatever the experiment asks of its GPU; 3 steps, validated once
TINY = ["trainer.max_steps=3", "trainer.val_check_interval=3", "logger=csv", "trainer.accelerator=cpu",
        "trainer.precision=32-true", "task.compile=false", "data.num_workers=0"]
# >= 2 s a run on the CI machine: 1,025 Pathfinder tokens, BPE training, 100K MQAR examples generated per run
SLOW = {"lra_pathfinder", "gpt_124m", "mqar", "mqar_lsh", "mqar_xl"}


def sweep_arms(experiment: str) -> list[tuple[str, str]]:
    """(key, value) for each value of each config-picking key of the experiment's sweep."""
    cfg = make_cfg(tempfile.mkdtemp(), f"experiment={experiment}")
    params = cfg.hydra.sweeper.get("params") or {}
    arms = []
    for key, values in params.items():
        if "." not in key:  # a config group, not a size
            arms += [(key, v.strip()) for v in str(values).split(",")]
    return arms


def _cases():
    for exp in EXPERIMENTS:
        arms = sweep_arms(exp) or [(None, None)]
        for key, value in arms:
            slow = exp in SLOW
            ident = exp + (f"-{key}={value}" if key else "") + ("-slow" if slow else "")
            yield pytest.param(exp, key, value, id=ident, marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("experiment, key, value", list(_cases()))
def test_experiment_trains_a_few_tiny_steps(tmp_path, experiment, key, value):
    arm = [f"{key}={value}"] if key else []
    cfg = make_cfg(tmp_path, f"experiment={experiment}", *arm, *TINY)
    if key:
        assert cfg.hydra.runtime.choices.get(key) == value, f"{key}={value} did not select that config"
    metrics = train_script.train(cfg)
    assert metrics["global_step"] == 3
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert math.isfinite(saved["val/loss"]), saved
    if key == "attention":  # the arm's core (performer_lra is the performer core with LRA's options)
        assert saved["attention"] == cfg.model.attention.core == value.removesuffix("_lra")


def test_every_experiment_is_covered_and_the_sweeps_are_read():
    """The parametrisation above is built from the files: a new experiment joins it, and sweeps are not skipped."""
    ids = [c.id for c in _cases()]
    assert {i.split("-")[0] for i in ids} == set(EXPERIMENTS)
    assert {"mqar-attention=" + c for c in ("causal", "sliding_window", "sparse_strided", "performer", "linear")} <= \
        {i.removesuffix("-slow") for i in ids}
    assert ("attention", "lsh") in sweep_arms("mqar_lsh") and len(sweep_arms("mqar_lsh")) == 1
