"""RETRO's language modelling: next-token loss with each batch's retrieved neighbours (data.retro).

Validation also scores the tokens whose chunk has little overlap with what the model retrieved for it
(`chunk_overlap` <= data.near_dup_threshold): `val/bpb_novel`, the paper's guard against a gain that is only
copying near-duplicates. The share of near-duplicate chunks is logged as `val/near_dup_frac`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from zoo.tasks.language_modeling import CausalLM, token_cross_entropy


def retro_token_loss(net, input_ids, labels, neighbours=None, neighbour_mask=None) -> torch.Tensor:
    return token_cross_entropy(net(input_ids, neighbours=neighbours, neighbour_mask=neighbour_mask), labels)


class RetroLM(CausalLM):
    def _retrieved(self, batch) -> dict:
        # an arm without retrieval (model.retrieval=false, or a GPT) reads the same sequences, no neighbours
        if not self.net.cfg.retrieval or "neighbours" not in batch:
            return {}
        return {"neighbours": batch["neighbours"], "neighbour_mask": batch.get("neighbour_mask")}

    def on_fit_start(self):
        dm = self.trainer.datamodule
        m = getattr(dm, "chunk_len", None)
        if self.net.cfg.retrieval and m is not None and m != self.net.cfg.chunk_len:
            raise ValueError(f"data.chunk_len={m} differs from model.chunk_len={self.net.cfg.chunk_len}: the model "
                             "groups positions by the chunks the neighbours were retrieved for")

    def _loss(self, batch):
        logits = self.runner(batch["input_ids"], **self._retrieved(batch))
        return token_cross_entropy(logits, batch["labels"]), logits, batch["labels"]

    def training_step(self, batch, batch_idx):
        loss = self.compiled("retro_token_loss", retro_token_loss)(
            self.net, batch["input_ids"], batch["labels"], **self._retrieved(batch))
        return self.training_loss(loss, batch["input_ids"].numel())

    def validation_step(self, batch, batch_idx):
        loss, logits, labels = super().validation_step(batch, batch_idx)
        overlap = batch.get("chunk_overlap")
        if overlap is None:
            return loss, logits, labels
        dm = self.trainer.datamodule
        b, l = overlap.shape  # l chunks of the sequence; a position's loss counts for the chunk it sits in
        per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                                    reduction="none").view(b, l, -1)
        keep = (labels != -100).view(b, l, -1) & (overlap <= dm.near_dup_threshold)[..., None]
        count = int(keep.sum())
        if count:
            self.log("val/loss_novel", (per_token * keep).sum() / count, on_epoch=True, batch_size=count,
                     sync_dist=True)
        return loss, logits, labels

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        dm = self.trainer.datamodule
        novel = self.trainer.callback_metrics.get("val/loss_novel")
        bpt = getattr(dm, "val_bytes_per_token", None)
        if novel is not None and bpt:
            self.log("val/bpb_novel", novel / math.log(2) / bpt, sync_dist=True)
        frac = getattr(dm, "near_dup_fraction", None)
        if frac is not None:
            self.log("val/near_dup_frac", torch.tensor(frac, dtype=torch.float32), sync_dist=True)
