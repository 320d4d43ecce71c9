"""Many processes: DDP on CPU (gloo) through train.py, the FSDP config, and the SLURM launcher's script."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zoo

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ["model=gpt", "debug=smoke", "logger=csv", "trainer.max_steps=12", "trainer.val_check_interval=6"]


def run_train(cwd: Path, *args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "ZOO_CACHE_DIR": str(cwd / "cache")}
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def weights(run_dir: Path) -> dict:
    ckpts = list(run_dir.rglob("last.ckpt"))
    assert len(ckpts) == 1, ckpts
    model, _ = zoo.load_checkpoint(ckpts[0])  # a distributed run's checkpoint loads in this one process
    return model.state_dict()


def test_ddp_sweep_on_two_cpu_processes_matches_one_process_with_the_same_global_batch(tmp_path):
    # a 2-job sweep, each job 2 DDP processes of batch 8; against one process of batch 16
    run_train(tmp_path, "-m", *SMOKE, "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "seed=1234,7",
              f"hydra.sweep.dir={tmp_path / 'sweep'}")
    run_train(tmp_path, *SMOKE, "data.batch_size=16", f"hydra.run.dir={tmp_path / 'single'}")
    # one directory per job, none per rank, nothing written outside the given directories
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "single", "sweep"]
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    for job in jobs:
        assert len(list(job.rglob("metrics.json"))) == 1 and len(list(job.rglob("metrics.csv"))) == 1  # one logger run
    ddp, single = weights(jobs[0]), weights(tmp_path / "single")
    for name, w in single.items():  # same data, same averaged gradients: the same weights after 12 steps
        torch.testing.assert_close(ddp[name], w, atol=2e-4, rtol=1e-3)
    m_ddp = json.loads((jobs[0] / "metrics.json").read_text())
    m_single = json.loads((tmp_path / "single" / "metrics.json").read_text())
    assert m_ddp["val/loss"] == pytest.approx(m_single["val/loss"], rel=1e-3)
    assert m_ddp["global_step"] == m_single["global_step"] == 12
    # the other job ran with its own seed, in its own directory
    assert not torch.allclose(weights(jobs[1])["trunk.tok_emb.weight"], ddp["trunk.tok_emb.weight"])


def test_rank_batches_are_slices_of_the_single_process_batches():
    from data.loading import ResumableBatchSampler
    one = list(ResumableBatchSampler(100, 8, True, seed=3))
    ranks = [list(ResumableBatchSampler(100, 4, True, seed=3, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)
    for b, batch in enumerate(one):
        assert [i for _, i, _ in ranks[0][b] + ranks[1][b]] == [i for _, i, _ in batch]


def test_fsdp_config_wraps_each_block():
    from helpers import make_cfg
    from hydra.utils import instantiate

    import train  # noqa: F401  (resolvers)
    from zoo.blocks import Block
    cfg = make_cfg(Path("/tmp"), "trainer=fsdp", "trainer.strategy.activation_checkpointing=true")
    strategy = instantiate(cfg.trainer.strategy)
    assert type(strategy).__name__ == "FSDPStrategy"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {Block}
    assert cfg.trainer.precision == "bf16-mixed"
    with pytest.raises(Exception, match="sharding_strategy=.ALL.; valid choices: FULL_SHARD"):  # hydra wraps it
        instantiate(make_cfg(Path("/tmp"), "trainer=fsdp", "trainer.strategy.sharding_strategy=ALL").trainer.strategy)


def test_slurm_launcher_composes_into_a_submission_script():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sys.path.insert(0, str(ROOT / "scripts"))
    from slurm_script import sbatch_script
    text = sbatch_script(["trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2", "hydra.launcher.nodes=2",
                          "hydra.launcher.gpus_per_node=4", "hydra.launcher.partition=h200",
                          "hydra.launcher.timeout_min=90", "model=bert"])
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --partition=h200", "#SBATCH --time=90", "#SBATCH --job-name=bert", "srun "):
        assert line in text, text
