"""What every task shares: the network, AdamW + warmup/cosine, metrics of speed and memory.

The network is built from the model config dict stored as a hyperparameter, so every checkpoint
carries what is needed to rebuild its model in a bare Python session (zoo.load_checkpoint).
"""
from __future__ import annotations

import collections
import functools
import math
import resource
import time

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision

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


def warmup_rsqrt(step: int, warmup: int) -> float:
    """Linear warmup, then lr * sqrt(warmup / step): the Tensor2Tensor schedule LRA trained with
    ("constant * linear_warmup * rsqrt_decay"), here normalised so that its peak, at `warmup`, is `lr`."""
    if step < warmup:
        return (step + 1) / warmup
    return math.sqrt(warmup / step)


SCHEDULES = ("cosine", "rsqrt")
# torch.compile modes a training step can take; reduce-overhead (CUDA graphs) is left out: Lightning's loop keeps
# outputs of one step (the logged loss) past the next replay, which CUDA graphs overwrite
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")


def check_compile_mode(mode: str) -> None:
    if mode not in COMPILE_MODES:
        raise ValueError(f"task.compile_mode={mode!r}: choose one of {', '.join(COMPILE_MODES)}")


def check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"task.schedule={schedule!r}: choose one of {', '.join(SCHEDULES)}")


class ZooTask(pl.LightningModule):
    def __init__(self, model: dict, lr: float = 1e-3, weight_decay: float = 0.1, betas=(0.9, 0.95), eps: float = 1e-8,
                 warmup_steps: int = 100, min_lr_ratio: float = 0.1, compile: bool = False, schedule: str = "cosine",
                 compile_mode: str = "default"):
        check_schedule(schedule)
        check_compile_mode(compile_mode)
        super().__init__()
        self.net = build_model(model)
        self.save_hyperparameters()
        # store the *validated* config (defaults filled in): the checkpoint then rebuilds exactly this model
        self.hparams["model"] = self.net.cfg.to_dict()
        self.throughput = Throughput()
        self._peak = None
        # compiled callables, by name: a plain dict, so that no compiled wrapper is registered as a submodule
        # (it would put a second copy of every weight under `_compiled._orig_mod.*` into the state dict, and a
        # fresh task resuming from that checkpoint would refuse the unexpected keys)
        self._compiled: dict = {}
        self._pending_losses: collections.deque = collections.deque()  # (step, pinned host copy, CUDA event)
        self._host_loss: float | None = None  # the latest training loss that has reached the host

    def compiled(self, name: str, fn):
        """`fn` compiled once (by `name`) when task.compile=true, else `fn` itself: the plain path."""
        if not self.hparams.compile:
            return fn
        if name not in self._compiled:
            mode = self.hparams.get("compile_mode", "default")  # checkpoints from before the option lack it
            self._compiled[name] = torch.compile(fn, mode=None if mode == "default" else mode)
        return self._compiled[name]

    # the network the steps run: compiled lazily so that the uncompiled module stays in the checkpoint
    @property
    def runner(self):
        return self.compiled("net", self.net)

    def configure_optimizers(self):
        hp = self.hparams
        fused = self.device.type == "cuda"
        opt = torch.optim.AdamW(param_groups(self.net, hp.weight_decay), lr=hp.lr, betas=tuple(hp.betas), eps=hp.eps,
                                fused=fused)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        # a run too short for its warmup (a smoke test) warms up over its first tenth instead
        warmup = hp.warmup_steps if total >= 2 * hp.warmup_steps else min(hp.warmup_steps, max(1, total // 10))
        if hp.get("schedule", "cosine") == "rsqrt":
            factor = functools.partial(warmup_rsqrt, warmup=warmup)
        else:
            factor = functools.partial(warmup_cosine, warmup=warmup, total=total, min_ratio=hp.min_lr_ratio)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        # Lightning's mixed-precision plugin refuses to clip for an optimizer that unscales gradients itself
        # (fused AdamW), also under bf16-mixed, where there is no scaler and so nothing to unscale: clip plainly then.
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and getattr(plugin, "scaler", False) is None \
                and getattr(optimizer, "_step_supports_amp_scaling", False):
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")
            return
        self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @staticmethod
    def _nonfinite(value: float, step: int) -> NonFiniteLossError:
        return NonFiniteLossError(
            f"loss is {value} at step {step}: stopping; the last good checkpoint is kept "
            "(lower optim.lr, raise trainer.gradient_clip_val, or check the data)"
        )

    def check_finite(self, loss: torch.Tensor) -> None:
        """Stop the run on a NaN/inf loss.

        On the CPU the check is immediate. On CUDA it costs no synchronisation: the loss travels to pinned host
        memory asynchronously and is read once its copy has landed (a step or two later), so the host keeps
        queueing work ahead of the GPU. A checkpoint waits for every pending loss (`on_save_checkpoint`): a
        non-finite loss stops the run before any checkpoint that follows it is written."""
        loss = loss.detach()
        if loss.device.type != "cuda":
            value = float(loss)
            self._host_loss = value
            if not math.isfinite(value):
                raise self._nonfinite(value, self.global_step)
            return
        host = torch.empty((), dtype=torch.float32, pin_memory=True)
        host.copy_(loss, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending_losses.append((self.global_step, host, event))
        self._drain_losses(wait=False)

    def _drain_losses(self, wait: bool) -> None:
        """Read the losses whose copies have landed (all of them if `wait`); raise on the first non-finite."""
        while self._pending_losses:
            step, host, event = self._pending_losses[0]
            if not wait and not event.query():
                return
            event.synchronize()
            self._pending_losses.popleft()
            value = host.item()
            self._host_loss = value
            if not math.isfinite(value):
                self._pending_losses.clear()
                raise self._nonfinite(value, step)

    def on_save_checkpoint(self, checkpoint):
        self._drain_losses(wait=True)

    def on_train_end(self):
        self._drain_losses(wait=True)

    def log_train_loss(self, loss: torch.Tensor) -> None:
        """Check and log the training loss without a per-step GPU sync: the logger gets this step's tensor
        (read every trainer.log_every_n_steps); the progress bar, the latest loss that has reached the host."""
        self.check_finite(loss)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        if self._host_loss is not None:
            self.log("loss", _host(self._host_loss), on_step=True, on_epoch=False, prog_bar=True, logger=False)

    def training_loss(self, loss: torch.Tensor, tokens: int) -> torch.Tensor:
        """What every training step ends with: log the task loss (comparable with dense models) and the speed, then
        add the MoE routing losses from the statistics the forward left behind (none without MoE layers)."""
        self.log_train_loss(loss)
        self.log_speed(tokens)
        aux = self.net.aux_loss()
        if aux is not None:
            self.log_moe(aux)
            loss = loss + aux
        return loss

    def log_speed(self, tokens: int) -> None:
        """tokens/s, MFU and peak memory, from rank-local figures (all ranks run the same shapes)."""
        if self._peak is None:
            dtype = torch.bfloat16 if "bf16" in str(self.trainer.precision) else torch.float32
            self._peak = peak_flops(self.device, dtype)[0]
        seq_len = self.trainer.datamodule.seq_len if self.trainer.datamodule is not None else 1
        stats = self.throughput.step(tokens, self.net.flops_per_token(seq_len), self._peak, self.trainer.world_size)
        # wall time since this process's first step (validation included): loss-vs-time curves (scripts/curves.py)
        now = time.perf_counter()
        self._t_first_step = getattr(self, "_t_first_step", None) or now
        stats["elapsed_s"] = now - self._t_first_step
        if self.device.type == "cuda":
            stats["peak_mem_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:  # the process's peak resident set: an upper bound (it includes Python and the data)
            stats["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        for k, v in stats.items():
            self.log(f"train/{k}", _host(v), on_step=True, on_epoch=False, prog_bar=k == "tokens_per_s")

    def log_moe(self, aux: torch.Tensor) -> None:
        """The weighted MoE aux loss every step; on logging steps also the unweighted balance and z losses, each
        layer's max/min expert load and, to the loggers only, every expert's load (share of the layer's routed
        tokens; 1/E when balanced) as moe/load_l{layer}_e{expert}: all read from the device in one sync."""
        self.log("train/moe_aux", aux.detach(), on_step=True, on_epoch=False)
        if (self.global_step + 1) % max(1, self.trainer.log_every_n_steps):  # Lightning's rule for writing logs
            return
        lb, z = self.net.moe_losses()
        load = self.net.expert_load()
        values = torch.cat([torch.stack([lb.detach(), z.detach()]).float(), load.detach().float().flatten()]).tolist()
        self.log("moe/balance_loss", _host(values[0]), on_step=True, on_epoch=False)
        self.log("moe/z_loss", _host(values[1]), on_step=True, on_epoch=False)
        if not hasattr(self, "_active_params"):  # so that compare.py tables can show active vs total
            self._active_params = self.net.num_params(active=True)
        self.log("moe/active_params", _host(self._active_params), on_step=True, on_epoch=False)
        n_layers, n_experts = load.shape
        per_expert = {}
        for i in range(n_layers):
            row = values[2 + i * n_experts: 2 + (i + 1) * n_experts]
            self.log(f"moe/load_max_l{i}", _host(max(row)), on_step=True, on_epoch=False)
            self.log(f"moe/load_min_l{i}", _host(min(row)), on_step=True, on_epoch=False)
            per_expert.update({f"moe/load_l{i}_e{j}": v for j, v in enumerate(row)})
        # straight to the loggers: layers x experts numbers belong in wandb/CSV, not in every run's summary table
        for lg in self.loggers:
            lg.log_metrics(per_expert, step=self.global_step)

    def on_train_batch_start(self, batch, batch_idx):
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.log("train/lr", _host(lr), on_step=True, on_epoch=False)


def _host(value: float) -> torch.Tensor:
    """A host-side number as a CPU tensor for self.log: Lightning turns a Python number into a tensor on the
    module's device, a blocking copy that waits for every queued GPU kernel (a full sync per logged number)."""
    return torch.tensor(float(value), dtype=torch.float32)
