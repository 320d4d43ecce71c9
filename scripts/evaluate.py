"""Validation metrics of a checkpoint, on the data it was trained with (or other data).

    python scripts/evaluate.py ckpt=outputs/runs/<run>/checkpoints/best-step800.ckpt [limit_batches=50]
        [source=<file|folder|hf:name>] [batch_size=16] [device=auto]
The last line printed is JSON: {"val/loss": ..., "val/ppl": ..., "val/bpb": ..., ...}.
"""
from __future__ import annotations

import importlib
import json
import sys

from _args import parse

import lightning.pytorch as pl
import torch

from zoo.checkpoint import CheckpointError, read_checkpoint

DEFAULTS = {"ckpt": None, "limit_batches": 50, "source": None, "batch_size": None, "device": "auto"}


def _import(target: str):
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


def evaluate(args: dict) -> dict:
    ckpt = read_checkpoint(args["ckpt"])
    run = ckpt.get("zoo_run")
    if not run or "task" not in run:
        raise CheckpointError(f"checkpoint {args['ckpt']} carries no task/data config (not written by train.py)")
    hparams = dict(ckpt["hyper_parameters"])
    task = _import(run["task"])(**hparams)
    task.load_state_dict(ckpt["state_dict"])
    data_cfg = {k: v for k, v in run["data"].items() if k != "_target_"}
    for key in ("source", "batch_size"):
        if args[key] is not None:
            data_cfg[key] = args[key]
    dm = _import(run["data"]["_target_"])(**data_cfg)
    accelerator = ("gpu" if torch.cuda.is_available() else "cpu") if args["device"] == "auto" else args["device"]
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False,
                         limit_val_batches=args["limit_batches"], enable_model_summary=False,
                         precision="bf16-mixed" if accelerator in ("gpu", "cuda") else "32-true")
    results = trainer.validate(task, datamodule=dm, verbose=False)[0]
    return {k: float(v) for k, v in results.items()}


def main(argv: list[str]) -> dict:
    metrics = evaluate(parse(argv, DEFAULTS, required=("ckpt",)))
    print(json.dumps(metrics, sort_keys=True))
    return metrics


if __name__ == "__main__":
    main(sys.argv[1:])
