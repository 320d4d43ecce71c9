"""Causal LM (next token) and masked LM (BERT's 15% with 80/10/10, masking done by the data module)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.tasks.base import ZooTask


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions whose label is not -100, computed in float32."""
    return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)


def token_loss(net, input_ids, attention_mask, labels) -> torch.Tensor:
    """The training loss: network and cross-entropy in one function, so that under task.compile=true they
    compile as one graph. Compiled apart, the float32 copy of the (tokens, vocab) logits, the log-softmax and
    its gradient each make a pass over memory: GPT-2 124M, batch 32 x 1024 (3.3 GB of bf16 logits) on an H200
    spent 17 ms of GPU time per step on them; compiled together they fuse into one reduction forward and one
    pass backward (4.3 ms), and the float32 logits are never stored (peak memory 30.4 -> 15.5 GiB).
    Run uncompiled, this is exactly the plain path (tests/test_fast_paths.py)."""
    return token_cross_entropy(net(input_ids, attention_mask=attention_mask), labels)


class _TokenPrediction(ZooTask):
    def _loss(self, batch):
        logits = self.runner(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        labels = batch["labels"]
        return token_cross_entropy(logits, labels), logits, labels

    def training_step(self, batch, batch_idx):
        loss = self.compiled("token_loss", token_loss)(
            self.net, batch["input_ids"], batch.get("attention_mask"), batch["labels"])
        # MoE routing losses are added outside the compiled function
        return self.training_loss(loss, batch["input_ids"].numel())

    def validation_step(self, batch, batch_idx):
        loss, logits, labels = self._loss(batch)
        n = (labels != -100).sum()
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=int(n), sync_dist=True)
        return loss, logits, labels

    def on_validation_epoch_end(self):
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is None:
            return
        self.log("val/ppl", torch.exp(loss.clamp(max=50)), sync_dist=True)
        dm = self.trainer.datamodule
        bpt = getattr(dm, "val_bytes_per_token", None) if dm is not None else None
        if bpt:
            self.log("val/bpb", loss / math.log(2) / bpt, sync_dist=True)


class CausalLM(_TokenPrediction):
    """GPT-style: predict token t+1 from tokens <= t. Logs loss, perplexity and bits per byte."""


class MaskedLM(_TokenPrediction):
    """BERT-style: predict the masked tokens from both sides. Also logs masked-token accuracy."""

    def validation_step(self, batch, batch_idx):
        loss, logits, labels = super().validation_step(batch, batch_idx)
        mask = labels != -100
        acc = (logits.argmax(-1)[mask] == labels[mask]).float().mean()
        self.log("val/acc", acc, on_epoch=True, prog_bar=True, batch_size=int(mask.sum()), sync_dist=True)
