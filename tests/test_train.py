"""End to end through train.py: training, checkpoints, resume, loading, scripts, bad input."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import open_dict

import zoo
from helpers import ROOT, make_cfg

sys.path.insert(0, str(ROOT / "scripts"))
import train as train_script  # noqa: E402


def run(tmp_path, *overrides, smoke=True, callbacks=None):
    cfg = make_cfg(tmp_path, *overrides, smoke=smoke)
    if callbacks:
        with open_dict(cfg):
            cfg.callbacks.update(callbacks)
    return train_script.train(cfg), cfg


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt")
    metrics, cfg = run(out)
    return out, metrics


def test_gpt_smoke_writes_checkpoints_metrics_and_offline_wandb(gpt_run):
    out, metrics = gpt_run
    assert metrics["global_step"] == 20
    assert (out / "checkpoints" / "last.ckpt").exists()
    assert list((out / "checkpoints").glob("best-*.ckpt"))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["model"] == "gpt" and "val/loss" in saved and "val/bpb" in saved
    assert list((out / "wandb").glob("offline-run-*")), "the offline wandb run is missing"


def test_load_checkpoint_and_generate(gpt_run):
    out, _ = gpt_run
    model, cfg = zoo.load_checkpoint(out / "checkpoints" / "last.ckpt")
    assert cfg.arch == "decoder" and cfg.d_model == 64
    x = torch.randint(0, 256, (1, 10))
    assert model(x).shape == (1, 10, cfg.vocab_size)
    import generate

    text = generate.main([f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "prompt=def ", "max_new_tokens=12",
                          "temperature=0"])
    assert text.startswith("def ") and len(text.encode()) > 4


def test_evaluate_prints_json_metrics(gpt_run, capsys):
    out, _ = gpt_run
    import evaluate

    metrics = evaluate.main([f"ckpt={out / 'checkpoints' / 'last.ckpt'}", "limit_batches=2"])
    assert {"val/loss", "val/ppl", "val/bpb"} <= set(metrics)
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(metrics)


@pytest.mark.parametrize("overrides", [["model=bert"], ["model=bert", "task=classification"]])
def test_bert_tasks_train(tmp_path, overrides):
    metrics, _ = run(tmp_path, *overrides)
    assert "val/acc" in metrics and metrics["global_step"] == 20


def test_bpe_tokenizer_is_trained_cached_and_used(tmp_path):
    import sysconfig

    source = str(Path(sysconfig.get_paths()["stdlib"]) / "json")
    metrics, cfg = run(tmp_path, "data.tokenizer=bpe", "data.bpe_vocab_size=300", f"data.source={source}",
                       "data.batch_size=2", "trainer.max_steps=4", "trainer.val_check_interval=2")
    assert list(Path(cfg.paths.cache_dir).glob("bpe-300-*.json"))
    model, mcfg = zoo.load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert mcfg.vocab_size == 320  # 300 tokens padded up to a multiple of 64


@pytest.mark.parametrize("logger, written", [("tensorboard", "tensorboard/*/events.out.tfevents.*"),
                                             ("csv", "csv/*/metrics.csv"), ("none", None)])
def test_each_logger_writes_its_files(tmp_path, logger, written):
    metrics, _ = run(tmp_path, f"logger={logger}", "trainer.max_steps=4", "trainer.val_check_interval=2")
    assert metrics["global_step"] == 4 and (tmp_path / "metrics.json").exists()
    if written:
        assert list(tmp_path.glob(written)), f"logger={logger} wrote nothing"


def test_loss_falls(tmp_path):
    metrics, _ = run(tmp_path, "trainer.max_steps=80", "trainer.val_check_interval=80", "task.lr=3e-3")
    assert metrics["val/loss"] < 3.6  # uniform over 320 byte ids is ln(320) = 5.77


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("model", ["gpt", "bert"])  # bert: dropout 0.1 and MLM masking
def test_resume_ends_with_the_same_weights(tmp_path, model):
    """30 steps in one go == 20 steps, stop, resume from last.ckpt, 10 more (CPU)."""
    common = [f"model={model}", "trainer.max_steps=30", "trainer.val_check_interval=10", "logger=csv"]
    run(tmp_path / "straight", *common)
    run(tmp_path / "first", *common, callbacks={"stop": {"_target_": "helpers.StopAtStep", "step": 20}})
    first_last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(first_last, weights_only=True)["global_step"] == 20
    run(tmp_path / "resumed", *common, f"ckpt_path={first_last}")
    a = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = _weights(tmp_path / "resumed" / "checkpoints" / "last.ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5, msg=k)


def test_last_ckpt_is_the_newest_state_when_val_loss_stops_improving(tmp_path):
    """last.ckpt is rewritten at every validation, not only when the best checkpoint changes (Lightning's
    save_last): with mode=max the falling val/loss never improves after step 4, yet an interrupted run's
    last.ckpt holds step 8 and ckpt_path=auto continues from there to the same weights as one go."""
    common = ["trainer.max_steps=12", "trainer.val_check_interval=4", "logger=csv",
              "callbacks.model_checkpoint.mode=max"]
    run(tmp_path / "straight", *common)
    run(tmp_path / "auto", *common, "ckpt_path=auto", callbacks={"stop": {"_target_": "helpers.StopAtStep", "step": 8}})
    ckpts = tmp_path / "auto" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["best-step4.ckpt", "last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 8
    metrics, _ = run(tmp_path / "auto", *common, "ckpt_path=auto")
    assert metrics["global_step"] == 12
    a = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    for k, v in _weights(ckpts / "last.ckpt").items():
        torch.testing.assert_close(v, a[k], atol=1e-6, rtol=1e-5, msg=k)


def test_ckpt_path_auto_starts_afresh_resumes_and_keeps_a_finished_run(tmp_path, capsys):
    """A rerun into the same directory: no checkpoint yet -> a fresh start; an interrupted run -> it continues
    from its own last.ckpt (the same weights as one go); a finished run -> nothing trained, results kept."""
    common = ["trainer.max_steps=12", "trainer.val_check_interval=4", "logger=csv"]
    run(tmp_path / "straight", *common)
    run(tmp_path / "auto", *common, "ckpt_path=auto", callbacks={"stop": {"_target_": "helpers.StopAtStep", "step": 8}})
    last = tmp_path / "auto" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 8
    metrics, _ = run(tmp_path / "auto", *common, "ckpt_path=auto")
    assert metrics["global_step"] == 12 and f"resuming from {last}" in capsys.readouterr().out
    a = _weights(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    for k, v in _weights(last).items():
        torch.testing.assert_close(v, a[k], atol=1e-6, rtol=1e-5, msg=k)
    written = (tmp_path / "auto" / "metrics.json").read_text()
    again, _ = run(tmp_path / "auto", *common, "ckpt_path=auto")
    assert "nothing trained, metrics.json kept" in capsys.readouterr().out
    assert (tmp_path / "auto" / "metrics.json").read_text() == written and again == json.loads(written)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "trainer.max_steps=30", "logger=csv",
            callbacks={"poison": {"_target_": "helpers.PoisonAtStep", "step": 15}})
    assert e.value.code == 2
    assert "loss is nan" in capsys.readouterr().err
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 10
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


@pytest.mark.parametrize("group", ["model", "attention", "data", "trainer", "logger", "task"])
def test_unknown_names_list_the_valid_choices(tmp_path, group):
    with pytest.raises((ConfigCompositionException, MissingConfigException)) as e:
        make_cfg(tmp_path, f"{group}=no_such_thing")
    assert "Available options" in str(e.value)


@pytest.mark.parametrize("overrides, match", [
    (["model=gpt", "attention=full"], "cores that would work: causal"),
    (["model.d_model=65"], "model.d_model=65 must be divisible by model.n_heads=4"),
    (["model.n_kv_heads=3"], "must be divisible by model.n_kv_heads=3"),
    (["data.seq_len=100"], r"data.seq_len=100 is longer than the position table \(model.max_seq_len=64\)"),
    (["data.tokenizer=words"], "data.tokenizer='words'; valid choices: byte, bpe"),
    (["data.source=/no/such/dir"], "neither 'stdlib', an existing file or folder"),
    (["model.share_layers=true", "trainer=fsdp"], "model.share_layers=true with trainer=fsdp"),
])
def test_bad_sizes_and_fields_are_named(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        run(tmp_path, *overrides)
    assert not (tmp_path / "checkpoints").exists()


def test_bad_checkpoints_are_reported_and_never_overwritten(tmp_path, gpt_run):
    out, _ = gpt_run
    with pytest.raises(zoo.CheckpointError, match="does not exist"):
        zoo.load_checkpoint(tmp_path / "missing.ckpt")
    good = (out / "checkpoints" / "last.ckpt").read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good[: len(good) // 2])
    with pytest.raises(zoo.CheckpointError, match="truncated or corrupt"):
        zoo.load_checkpoint(truncated)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(zoo.CheckpointError, match="not an Attention Zoo checkpoint"):
        zoo.load_checkpoint(foreign)
    before = truncated.read_bytes()
    with pytest.raises(zoo.CheckpointError):
        run(tmp_path / "resume", f"ckpt_path={truncated}")
    assert truncated.read_bytes() == before
    assert not (tmp_path / "resume" / "checkpoints").exists()


# every experiment config (and every arm of its sweep) trains a few steps: tests/test_experiments.py


def test_multirun_sweep_then_compare(tmp_path):
    """`python train.py -m model=gpt,bert` as a user runs it: one directory and one metrics.json per job."""
    import subprocess

    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(ROOT / "train.py"), "-m", "model=gpt,bert", "debug=smoke", "logger=csv",
           "trainer.max_steps=4", "trainer.val_check_interval=2", f"hydra.sweep.dir={sweep}"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 2
    import compare

    rows = compare.main([str(sweep)])
    assert sorted(r["model"] for r in rows) == ["bert", "gpt"]
    assert (sweep / "compare.md").exists()


def test_resume_continues_the_same_wandb_run(tmp_path, gpt_run):
    out, _ = gpt_run
    last = out / "checkpoints" / "last.ckpt"
    run_id = torch.load(last, weights_only=True)["zoo_run"]["wandb_id"]
    assert run_id and list((out / "wandb").glob(f"offline-run-*-{run_id}"))
    run(tmp_path, f"ckpt_path={last}", "trainer.max_steps=22")
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}")), "the resumed run started a new wandb run"
    resumed = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["zoo_run"]["wandb_id"] == run_id
    assert resumed["global_step"] == 22  # no validation after step 20: last.ckpt is still the final state


def test_sweep_job_directories_stay_short_and_distinct():
    """Hydra names a sweep job's directory after its overrides; a long list once failed the run with
    'File name too long' (conf/hydra/default.yaml cuts it through train.short_dirname)."""
    long = ",".join(f"++model.attention.option_{i}={i}" for i in range(20))
    a, b = train_script.short_dirname(long + ",attention=causal"), train_script.short_dirname(long + ",attention=linear")
    assert len(a) <= 129 and a != b and train_script.short_dirname("attention=causal") == "attention=causal"
    assert "short_dirname" in (ROOT / "conf" / "hydra" / "default.yaml").read_text()


def test_rsqrt_schedule_and_a_bad_schedule_name(tmp_path):
    """task.schedule=rsqrt (LRA's warmup then lr * sqrt(warmup / step)); an unknown name is refused up front."""
    from zoo.tasks.base import warmup_rsqrt

    assert [warmup_rsqrt(s, 10) for s in (0, 4, 9, 10, 40)] == [0.1, 0.5, 1.0, 1.0, 0.5]
    with pytest.raises(ValueError, match=r"task.schedule='linear': choose one of cosine, rsqrt"):
        run(tmp_path / "bad", "task.schedule=linear")
    assert not (tmp_path / "bad" / "checkpoints").exists()
    with pytest.raises(ValueError, match=r"task.compile_mode='fast': choose one of default, max-autotune"):
        run(tmp_path / "bad_mode", "task.compile_mode=fast")
    assert not (tmp_path / "bad_mode" / "checkpoints").exists()
    metrics, cfg = run(tmp_path / "rsqrt", "task.schedule=rsqrt", "task.warmup_steps=5")
    lr = metrics["train/lr"] / cfg.task.lr  # the last logged step's factor, 20 steps in: about sqrt(5 / 19)
    assert metrics["global_step"] == 20 and (5 / 20) ** 0.5 <= lr <= (5 / 18) ** 0.5, lr


def test_shared_layers_train_save_and_load(tmp_path):
    """model.share_layers=true through train.py: the checkpoint loads back into one block at every layer."""
    metrics, _ = run(tmp_path, "model.share_layers=true", "model.n_layers=3")
    model, cfg = zoo.load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert cfg.share_layers and model.trunk.blocks[0] is model.trunk.blocks[2]
    assert metrics["params"] == model.num_params()
