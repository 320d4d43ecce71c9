"""build_model(name_or_config, **overrides): named models from conf/model/*.yaml, no Hydra needed."""
from __future__ import annotations

from pathlib import Path

import re

import torch
import yaml

from zoo.models.config import ModelConfig
from zoo.models.transformer import ZooModel

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# `${cuda_or:4096,1024}` in a model file: the first value where CUDA is available, the second elsewhere
# (long-sequence models default to lengths a CPU can train). train.py registers the same resolver with
# OmegaConf; here it is resolved by hand, so that zoo.models needs no config library.
_CUDA_OR = re.compile(r"^\$\{cuda_or:\s*([^,\s]+)\s*,\s*([^}\s]+)\s*\}$")


def cuda_or(gpu, cpu):
    return gpu if torch.cuda.is_available() else cpu


def _resolve(value):
    if isinstance(value, dict):
        return {k: _resolve(v) for k, v in value.items()}
    m = _CUDA_OR.match(value) if isinstance(value, str) else None
    return yaml.safe_load(cuda_or(*m.groups())) if m else value


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _load_group(group: str, name: str) -> dict:
    path = CONF_DIR / group / f"{name}.yaml"
    if not path.exists():
        raise ValueError(f"{group}={name!r} is unknown; valid choices: {', '.join(available(group))}")
    node = yaml.safe_load(path.read_text()) or {}
    merged: dict = {}
    for parent in node.pop("defaults", []):
        # a model file may start from another model of its group (`defaults: [gpt, _self_]`);
        # entries such as `override /task: mlm` concern training, not the network
        if isinstance(parent, str) and parent != "_self_":
            merged.update(_load_group(group, parent))
    # model files are `@package _global_` (so that they can pick a task): their fields sit under `model:`
    merged.update(node.get(group, node) if group == "model" else node)
    return _resolve(merged)


def model_config(name_or_config, **overrides) -> ModelConfig:
    if isinstance(name_or_config, ModelConfig):
        d = name_or_config.to_dict()
    elif isinstance(name_or_config, str):
        d = _load_group("model", name_or_config)
    else:
        d = dict(name_or_config)
    attention = overrides.pop("attention", None)
    if isinstance(attention, str):  # build_model("gpt", attention="causal") picks conf/attention/causal.yaml
        attention = _load_group("attention", attention)
    if attention is not None:
        d["attention"] = {**d.get("attention", {}), **attention}
    d.update(overrides)
    return ModelConfig.from_dict(d)


def build_model(name_or_config, **overrides) -> ZooModel:
    """`build_model("gpt", n_layers=2)`, `build_model({"arch": "encoder", ...})` or a ModelConfig."""
    return ZooModel(model_config(name_or_config, **overrides))
