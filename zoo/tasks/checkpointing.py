"""last.ckpt as the newest state of a run, whatever its validation loss does.

Lightning's `ModelCheckpoint(save_last=True)` rewrites last.ckpt only at a step where a monitored checkpoint
was saved, i.e. when val/loss improves (and once at the end if it never wrote one). A run whose loss stops
falling then resumes from its best step and silently repeats everything after it; on the H200 an LRA ListOps
run "resumed" three times from step 500 of 5,000. This callback writes last.ckpt at every validation and when
training ends, so `ckpt_path=auto` continues from where the run stopped.
"""
from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class LastCheckpoint(ModelCheckpoint):
    """`<dirpath>/last.ckpt`, rewritten at every validation and at the end of training."""

    def __init__(self, dirpath: str, filename: str = "last"):
        # no monitor + top 1 = the newest state replaces the previous one; no version counter, so a resumed
        # run rewrites its own last.ckpt instead of writing last-v1.ckpt beside it
        super().__init__(dirpath=dirpath, filename=filename, save_top_k=1, enable_version_counter=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the steps after the last validation (max_steps between two of them, a stop callback) are kept too
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.global_step == self._last_global_step_saved:
            return
        path = str(Path(self.dirpath) / f"{self.filename}{self.FILE_EXTENSION}")
        self.best_model_path = path  # part of the saved callback state, as ModelCheckpoint sets it before saving
        trainer.save_checkpoint(path, self.save_weights_only)
        self._last_global_step_saved = trainer.global_step
