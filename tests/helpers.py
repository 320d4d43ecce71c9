"""Test-only callbacks and config composition for end-to-end runs of train.py."""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]


def make_cfg(tmp_path, *overrides, smoke=True):
    """Compose conf/train.yaml as `python train.py ...overrides` would, writing into tmp_path."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=(["debug=smoke"] if smoke else []) + list(overrides),
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path)
        cfg.paths.root_dir = str(ROOT)
        cfg.hydra.runtime.output_dir = str(tmp_path)
        cfg.hydra.job.num = 0
    HydraConfig.instance().set_config(cfg)
    return cfg


def lightning_like_checkpoint(path, model):
    """What train.py's checkpoints hold for loading: the task's `net.` state and the model config."""
    torch.save({"state_dict": {f"net.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": {"model": model.cfg.to_dict()}}, path)


class StopAtStep(pl.Callback):
    """Ends fit gracefully after `step` optimizer steps: an interrupted run."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class PoisonAtStep(pl.Callback):
    """Turns the weights into NaN before `step`: the loss of that step is NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, *args):
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


def perturbed(model):
    """Add N(0, 0.05) noise to every weight (tests seed it), in eval mode: random-init models have zero biases and
    unit norms, which would hide a bias or norm weight mapped to the wrong place."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()
