"""Sequence classification from the first token's pooled representation (BERT's [CLS])."""
from __future__ import annotations

import torch.nn.functional as F

from zoo.tasks.base import ZooTask


class SequenceClassification(ZooTask):
    def __init__(self, model: dict, num_labels: int | None = None, **kw):
        if num_labels:
            model = {**model, "num_labels": num_labels}
        if not model.get("num_labels"):
            raise ValueError("task.num_labels (or model.num_labels) must be > 0 for classification")
        super().__init__(model, **kw)

    def _step(self, batch):
        logits = self.runner.classify(batch["input_ids"], attention_mask=batch.get("attention_mask"))
        loss = F.cross_entropy(logits.float(), batch["labels"])
        acc = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, acc

    def training_step(self, batch, batch_idx):
        loss, acc = self._step(batch)
        self.log("train/acc", acc, on_step=True, on_epoch=False)
        return self.training_loss(loss, batch["input_ids"].numel())

    def _evaluate(self, batch, split: str):
        loss, acc = self._step(batch)
        n = batch["labels"].shape[0]
        self.log(f"{split}/loss", loss, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)
        self.log(f"{split}/acc", acc, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=True)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):  # train.py test=true: the test split, after training
        self._evaluate(batch, "test")
