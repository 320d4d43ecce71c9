"""Causal LM (next token) and masked LM (BERT's 15% with 80/10/10, masking done by the data module)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.tasks.base import ZooTask


class _TokenPrediction(ZooTask):
    def _loss(self, batch):
        logits = self.runner(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), ignore_index=-100)
        return loss, logits, labels

    def training_step(self, batch, batch_idx):
        loss, logits, labels = self._loss(batch)
        self.check_finite(loss)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log_speed(batch["input_ids"].numel())
        return loss

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
