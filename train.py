"""Train a zoo model with Hydra + Lightning.

    python train.py                                   # GPT on the CPython stdlib (CPU or one GPU)
    python train.py model=bert                        # BERT, masked-LM
    python train.py model=gpt attention=causal data.tokenizer=bpe
    python train.py model=gpt debug=smoke             # a few tiny steps: does this config train?
    python train.py ckpt_path=outputs/runs/.../checkpoints/last.ckpt   # resume (same wandb run)
    python train.py -m ... hydra.sweep.dir=D ckpt_path=auto             # rerun: each job resumes its own last.ckpt
    python train.py -m model=gpt,bert                 # a sweep; then scripts/compare.py outputs/multiruns/...

Each run writes outputs/runs/<time>_<name>/: checkpoints/{last,best-*}.ckpt, metrics.json, the
resolved config (.hydra/), and the logger's files.

Data-parallel runs (trainer=ddp) launch one process per device by re-running this script. Hydra would
give each of them a run directory of its own (and, under -m, a sweep of its own); instead rank zero writes
its resolved config into its run directory and names it in ZOO_DDP_CONFIG, and the other ranks train from
that config without Hydra: one directory, one config, one logger run per run, also inside a sweep.
"""
from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from data.tokenizers import tokenizer_state
from zoo.checkpoint import read_checkpoint
from zoo.models import model_config
from zoo.models.registry import cuda_or
from zoo.tasks import NonFiniteLossError
from zoo.tasks.base import check_compile_mode, check_schedule


def wandb_mode() -> str:
    """online only with a key and a reachable server; otherwise offline, decided before wandb starts."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    has_key = bool(os.environ.get("WANDB_API_KEY")) or "api.wandb.ai" in (
        Path.home().joinpath(".netrc").read_text() if Path.home().joinpath(".netrc").exists() else "")
    if has_key:
        try:
            socket.create_connection(("api.wandb.ai", 443), timeout=3).close()
            return "online"
        except OSError:
            pass
    return "offline"


class RunInfo(pl.Callback):
    """Makes every checkpoint self-contained: the logger run id (a resumed run continues the same wandb
    run), the task and data config (scripts/evaluate.py), the tokenizer itself (scripts/generate.py), and
    the torch RNG state, so that dropout after a resume draws what an uninterrupted run would have drawn
    (Lightning does not save it; under DDP the saving rank's state is restored on every rank)."""

    def __init__(self, wandb_id: str | None, cfg: DictConfig, dm):
        self.wandb_id, self.dm = wandb_id, dm
        self.task_target = cfg.task._target_
        self.data_cfg = OmegaConf.to_container(cfg.data, resolve=True)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        checkpoint["zoo_run"] = {"wandb_id": self.wandb_id, "task": self.task_target, "data": self.data_cfg,
                                 "tokenizer": tokenizer_state(self.dm.load_tokenizer()),
                                 "rng": {"cpu": torch.get_rng_state(),
                                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}

    def on_load_checkpoint(self, trainer, pl_module, checkpoint):
        rng = checkpoint.get("zoo_run", {}).get("rng")
        if rng:
            torch.set_rng_state(rng["cpu"])
            if rng["cuda"] and torch.cuda.device_count() == len(rng["cuda"]):
                torch.cuda.set_rng_state_all(rng["cuda"])


def build_loggers(cfg: DictConfig, resume_id: str | None):
    loggers = []
    for name, lcfg in (cfg.get("logger") or {}).items():
        if name == "wandb":
            os.environ["WANDB_MODE"] = mode = wandb_mode()
            os.environ.setdefault("WANDB_SILENT", "true")
            extra = {"id": resume_id, "resume": "allow"} if resume_id else {}
            logger = instantiate(lcfg, **extra)
            print(f"[zoo] wandb mode: {mode}")
        else:
            logger = instantiate(lcfg)
        loggers.append(logger)
    return loggers


def check_test(cfg: DictConfig) -> None:
    """test=true needs a test split and a test step: refused before anything is built, not after training."""
    if not cfg.get("test"):
        return
    data, task = get_class(cfg.data._target_), get_class(cfg.task._target_)
    if data.test_dataloader is pl.LightningDataModule.test_dataloader:
        raise ValueError(f"test=true: the data module {data.__name__} has no test split; data modules with one: "
                         "LRADataModule (data=lra_listops, data=lra_pathfinder)")
    if cfg.data.get("num_test", None) == 0:
        raise ValueError("test=true with data.num_test=0: the test split is empty; set data.num_test > 0 or test=false")
    if task.test_step is pl.LightningModule.test_step:
        raise ValueError(f"test=true: the task {task.__name__} has no test step; tasks with one: "
                         "SequenceClassification (task=classification)")


def check_sizes(cfg: DictConfig) -> None:
    check_schedule(cfg.task.get("schedule", "cosine"))
    check_compile_mode(cfg.task.get("compile_mode", "default"))
    m, d = cfg.model, cfg.data
    if m.get("share_layers") and "fsdp" in str(OmegaConf.select(cfg, "trainer.strategy._target_", default="")):
        raise ValueError("model.share_layers=true with trainer=fsdp: FSDP shards each Block as its own unit and "
                         "cannot place one Block at every layer; use trainer=ddp")
    if m.get("position") in (None, "learned", "sinusoidal") and d.seq_len > m.max_seq_len:
        raise ValueError(f"data.seq_len={d.seq_len} is longer than the position table (model.max_seq_len={m.max_seq_len})")


def print_sample(net, dm, cfg: DictConfig) -> None:
    tok = dm.load_tokenizer()
    net = net.eval()
    device = next(net.parameters()).device
    if net.cfg.arch == "decoder":
        ids = torch.tensor([tok.encode(cfg.sample.prompt) or [tok.eos_id]], device=device)
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        # RETRO samples with neighbours retrieved from the training database, chunk by chunk
        retrieve = dm.retriever() if getattr(net.cfg, "retrieval", False) and hasattr(dm, "retriever") else None
        out = net.generate(ids, cfg.sample.max_new_tokens, cfg.sample.temperature, cfg.sample.top_k, generator=g,
                           retrieve=retrieve)
        print("\n[zoo] sample:\n" + tok.decode(out[0].tolist()) + "\n")
    elif hasattr(dm, "val_set") and hasattr(dm.val_set, "window"):
        batch = dm.val_set[(0, 0, 0)]
        ids, labels = batch["input_ids"][None].to(device), batch["labels"][None].to(device)
        with torch.no_grad():
            pred = net(ids).argmax(-1)
        filled = torch.where(labels != -100, pred, ids)[0].tolist()
        print("\n[zoo] masked input:\n" + tok.decode(ids[0].tolist()) + "\n[zoo] filled by the model:\n"
              + tok.decode(filled) + "\n")


def resolve_ckpt_path(cfg: DictConfig) -> str | None:
    """ckpt_path=auto resumes from this run directory's own last.ckpt when there is one and starts afresh when
    there is none: rerunning a command into the same directory (a fixed hydra.run.dir, or hydra.sweep.dir for
    every job of a sweep) continues where it was interrupted. Any other value is a path, or null."""
    path = cfg.get("ckpt_path")
    if path != "auto":
        return path
    ckpt_dir = OmegaConf.select(cfg, "callbacks.last_checkpoint.dirpath")
    if ckpt_dir is None:
        raise ValueError("ckpt_path=auto looks for last.ckpt where callbacks.last_checkpoint writes it; "
                         "this config has no callbacks.last_checkpoint.dirpath")
    last = Path(ckpt_dir) / "last.ckpt"
    if last.exists():
        print(f"[zoo] ckpt_path=auto: resuming from {last}")
        return str(last)
    return None


def train(cfg: DictConfig) -> dict:
    env = dict(os.environ)
    try:
        return _train(cfg)
    finally:
        # Lightning's DDP launcher leaves LOCAL_RANK, WORLD_SIZE, MASTER_PORT... in this process's environment;
        # the next job of a sweep would read them as "processes are launched externally" and wait forever
        for k in set(os.environ) - set(env):
            del os.environ[k]
        os.environ.update(env)


def _train(cfg: DictConfig) -> dict:
    # the model/core pair and the sizes are checked before any data is read or anything written
    model_config({**OmegaConf.to_container(cfg.model, resolve=True), "vocab_size": cfg.model.vocab_size or 1})
    check_sizes(cfg)
    check_test(cfg)
    pl.seed_everything(cfg.seed, workers=True)
    out_dir = Path(cfg.paths.output_dir)
    resume_id, start_step = None, None
    with open_dict(cfg):
        cfg.ckpt_path = resolve_ckpt_path(cfg)
    if cfg.get("ckpt_path"):
        # validate before anything is built or written: a bad path fails here, not after an epoch
        ckpt = read_checkpoint(cfg.ckpt_path)
        resume_id, start_step = ckpt.get("zoo_run", {}).get("wandb_id"), ckpt.get("global_step")
        del ckpt

    dm = instantiate(cfg.data)
    with open_dict(cfg):
        if cfg.model.get("vocab_size") is None:
            cfg.model.vocab_size = dm.vocab_size
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    task = instantiate(cfg.task, model=model_cfg, _convert_="all")

    loggers = build_loggers(cfg, resume_id)
    wandb_id = next((lg.experiment.id for lg in loggers if type(lg).__name__ == "WandbLogger"), None)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + [RunInfo(wandb_id or resume_id, cfg, dm)]
    tcfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    if tcfg.get("precision") == "auto":
        on_gpu = tcfg.get("accelerator") in ("gpu", "cuda") or (tcfg.get("accelerator") == "auto" and torch.cuda.is_available())
        tcfg["precision"] = "bf16-mixed" if on_gpu else "32-true"
    trainer = instantiate(tcfg, logger=loggers or False, callbacks=callbacks)
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    n_params = task.net.num_params()
    if trainer.is_global_zero:
        print(f"[zoo] {cfg.model.name}: {n_params / 1e6:.2f}M parameters, core={cfg.model.attention.core}, "
              f"output: {out_dir}")
    if trainer.world_size > 1 and trainer.is_global_zero:
        share_config_with_ranks(cfg, out_dir)

    try:
        trainer.fit(task, datamodule=dm, ckpt_path=cfg.get("ckpt_path"))
    except NonFiniteLossError as e:
        ckpt = trainer.checkpoint_callback
        last = getattr(ckpt, "last_model_path", "") if ckpt else ""
        print(f"[zoo] {e}\n[zoo] last good checkpoint: {last or 'none was written yet'}", file=sys.stderr)
        raise SystemExit(2) from None

    if start_step is not None and trainer.global_step == start_step and (out_dir / "metrics.json").exists():
        # a resume of a run that had already finished trains nothing: its results stay as they were written
        if trainer.is_global_zero:
            print(f"[zoo] {out_dir} had already reached step {start_step}: nothing trained, metrics.json kept")
        return json.loads((out_dir / "metrics.json").read_text())
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.is_tensor(v) and v.numel() == 1}
    if cfg.get("test"):  # the final weights, as training left them (not the best validation checkpoint)
        metrics.update({k: float(v) for k, v in trainer.test(task, datamodule=dm, verbose=False)[0].items()})
    metrics.update({"params": n_params, "global_step": trainer.global_step})
    if trainer.is_global_zero:
        (out_dir / "metrics.json").write_text(json.dumps({"model": cfg.model.name, "attention": cfg.model.attention.core,
                                                          "overrides": list(_overrides()), **metrics}, indent=2))
        ckpt = trainer.checkpoint_callback
        if ckpt is not None and ckpt.last_model_path:
            print(f"[zoo] checkpoints: {Path(ckpt.last_model_path).parent}")
        for lg in loggers:
            if type(lg).__name__ == "WandbLogger":
                print(f"[zoo] wandb run written to {lg.experiment.dir}")
        print_sample(task.net, dm, cfg)
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()  # one wandb run per job, also inside a multirun sweep
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # the next job of a sweep starts its own group
    return metrics


DDP_CONFIG_ENV = "ZOO_DDP_CONFIG"


def share_config_with_ranks(cfg: DictConfig, out_dir: Path) -> None:
    """Rank zero, before the other ranks are launched: the resolved config they will train from."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved.pop("hydra", None)
    path = out_dir / ".zoo_ddp_config.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(resolved), path)
    os.environ[DDP_CONFIG_ENV] = str(path)  # the launched ranks inherit the environment


def ddp_rank_config() -> DictConfig | None:
    """In a rank that Lightning launched (LOCAL_RANK > 0 or NODE_RANK > 0) of a run that shared its config."""
    path = os.environ.get(DDP_CONFIG_ENV)
    launched = int(os.environ.get("LOCAL_RANK", "0")) > 0 or int(os.environ.get("NODE_RANK", "0")) > 0
    return OmegaConf.load(path) if path and launched else None


def _overrides():
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().overrides.task
    except ValueError:
        return []


def short_dirname(name: str, limit: int = 120) -> str:
    """A sweep job's directory from its overrides, cut to `limit` characters plus a hash of the whole, so
    that many overrides cannot exceed the file system's 255-byte names (distinct jobs keep distinct names)."""
    if len(name) <= limit:
        return name
    return f"{name[:limit]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


# `${cuda_or:4096,1024}` in model files (zoo.models.registry resolves it the same way outside Hydra)
OmegaConf.register_new_resolver("cuda_or", cuda_or, replace=True)
OmegaConf.register_new_resolver("short_dirname", short_dirname, replace=True)  # conf/hydra/default.yaml


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("val/loss")  # for Hydra sweepers


if __name__ == "__main__":
    rank_cfg = ddp_rank_config()
    if rank_cfg is not None:
        train(rank_cfg)  # a launched rank: rank zero's resolved config, no Hydra, no directory of its own
    else:
        main()
