"""Load train.py's checkpoints without Hydra or Lightning: `load_checkpoint(path) -> (model, config)`.

Loading never executes code from a file: Lightning checkpoints are read with
`torch.load(weights_only=True)`. Every failure names the file and what is wrong with it.
Hugging Face format directories are zoo/hf.py's (load_pretrained / save_pretrained).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import torch

from zoo.models import ModelConfig, ZooModel


class CheckpointError(ValueError):
    pass


def read_checkpoint(path) -> dict:
    """The checkpoint's dict, or a CheckpointError saying why it cannot be one of ours."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory; for a Hugging Face directory use zoo.load_pretrained")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(f"checkpoint {path} holds objects that are not plain tensors/containers; "
                                  "refusing to unpickle them (it could run code)") from None
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt.get("hyper_parameters", {}):
        raise CheckpointError(f"checkpoint {path} is not an Attention Zoo checkpoint (no model config / state_dict)")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> ZooModel:
    cfg = ModelConfig.from_dict(ckpt["hyper_parameters"]["model"])
    model = ZooModel(cfg)
    prefix = "net."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    state = {k.replace("_orig_mod.", ""): v for k, v in state.items()}  # written by a compiled module
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit its own config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


def load_checkpoint(path, map_location="cpu") -> tuple[ZooModel, ModelConfig]:
    """Rebuild a model from a Lightning checkpoint written by train.py."""
    ckpt = read_checkpoint(path)
    model = model_from_checkpoint(ckpt).to(map_location).eval()
    return model, model.cfg
