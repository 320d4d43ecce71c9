"""Associative recall (MQAR): a causal LM scored only where it must recall, with accuracy there."""
from __future__ import annotations

from zoo.tasks.language_modeling import CausalLM


class AssociativeRecall(CausalLM):
    """Next-token loss over the labelled positions (the data module sets -100 elsewhere), plus `val/acc`:
    the fraction of labelled positions whose argmax prediction is the label (Zoology's metric)."""

    def validation_step(self, batch, batch_idx):
        loss, logits, labels = super().validation_step(batch, batch_idx)
        mask = labels != -100
        acc = (logits.argmax(-1)[mask] == labels[mask]).float().mean()
        self.log("val/acc", acc, on_epoch=True, prog_bar=True, batch_size=int(mask.sum()), sync_dist=True)
        return loss, logits, labels
