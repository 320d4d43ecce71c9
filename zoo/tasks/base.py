"""What every task shares: the network, AdamW + warmup/cosine, metrics of speed and memory.

The network is built from the model config dict stored as a hyperparameter, so every checkpoint
carries what is needed to rebuild its model in a bare Python session (zoo.load_checkpoint).
"""
from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from zoo.models import build_model
from zoo.tasks.throughput import Throughput, peak_flops


class NonFiniteLossError(RuntimeError):
    """Raised when the loss is NaN/inf: the run stops before a bad step can reach a checkpoint."""


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: no weight decay on norms, biases or embeddings."""
    decay, no_decay = [], []
    seen = set()
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            is_matrix = p.dim() >= 2 and not isinstance(module, torch.nn.Embedding) and "emb" not in module_name
            (decay if is_matrix else no_decay).append(p)
    # a tied LM head shares the embedding's tensor: it is seen first as the embedding, and stays undecayed
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class ZooTask(pl.LightningModule):
    def __init__(self, model: dict, lr: float = 1e-3, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8,
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, compile: bool = False):
        super().__init__()
        self.net = build_model(model)
        self.save_hyperparameters()
        # store the *validated* config (defaults filled in): the checkpoint then rebuilds exactly this model
        self.hparams["model"] = self.net.cfg.to_dict()
        self.throughput = Throughput()
        self._peak = None
        self._compiled = None

    # the network the steps run: compiled lazily so that the uncompiled module stays in the checkpoint
    @property
    def runner(self):
        if not self.hparams.compile:
            return self.net
        if self._compiled is None:
            self._compiled = torch.compile(self.net)
        return self._compiled

    def configure_optimizers(self):
        hp = self.hparams
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(param_groups(self.net, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(hp.warmup_steps, max(1, total // 10)) if total < hp.warmup_steps * 2 else hp.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, warmup, total, hp.min_lr_ratio))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def check_finite(self, loss: torch.Tensor) -> None:
        if not torch.isfinite(loss):
            raise NonFiniteLossError(
                f"loss is {loss.item()} at step {self.global_step}: stopping; the last good checkpoint is kept "
                "(lower optim.lr, raise trainer.gradient_clip_val, or check the data)"
            )

    def log_speed(self, tokens: int) -> None:
        """tokens/s, MFU and peak memory, from rank-local figures (all ranks run the same shapes)."""
        if self._peak is None:
            dtype = torch.bfloat16 if "bf16" in str(self.trainer.precision) else torch.float32
            self._peak = peak_flops(self.device, dtype)[0]
        seq_len = self.trainer.datamodule.seq_len if self.trainer.datamodule is not None else 1
        stats = self.throughput.step(tokens, self.net.flops_per_token(seq_len), self._peak, self.trainer.world_size)
        if self.device.type == "cuda":
            stats["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        for k, v in stats.items():
            self.log(f"train/{k}", v, on_step=True, on_epoch=False, prog_bar=k == "tokens_per_s")

    def on_train_batch_start(self, batch, batch_idx):
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/lr", lr, on_step=True, on_epoch=False)
