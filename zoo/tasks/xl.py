"""Causal LM over contiguous streams with a memory carried across batches (Transformer-XL).

Batches come from data.streams: row b of batch t continues row b of batch t-1. The trunk returns its
memory updated (detached) in an XLMemory; this task keeps one for training and one for validation (with
model.eval_mem_len positions, so evaluation may use a longer memory than training), drops it where the
streams restart (`reset`), and saves the training memory in checkpoints so that a resumed run continues
with the context an uninterrupted one would have had.
"""
from __future__ import annotations


from zoo.tasks.language_modeling import CausalLM, token_cross_entropy


class TransformerXLLM(CausalLM):
    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        cfg = self.net.cfg
        if cfg.recurrence != "xl":
            raise ValueError(f"task zoo.tasks.xl.TransformerXLLM needs model.recurrence=xl, got {cfg.recurrence!r} "
                             "(other decoders: task=causal_lm)")
        self.train_memory = self.net.trunk.new_memory(cfg.mem_len)
        self.val_memory = self.net.trunk.new_memory(cfg.eval_mem_len)

    @staticmethod
    def _apply_reset(memory, batch) -> None:
        reset = batch.get("reset")
        if reset is None:
            raise ValueError("the XL task needs batches with a 'reset' flag (contiguous streams): use data=streams")
        if bool(reset.any()):
            # every stream part has the same number of segments, so all rows restart on the same batch
            if not bool(reset.all()):
                raise ValueError("streams restarted in some batch rows only; the memory is reset per batch")
            memory.reset()

    def _xl_loss(self, batch, memory):
        self._apply_reset(memory, batch)
        logits = self.net(batch["input_ids"], cache=memory)
        return token_cross_entropy(logits, batch["labels"]), logits

    def training_step(self, batch, batch_idx):
        loss, _ = self._xl_loss(batch, self.train_memory)
        return self.training_loss(loss, batch["input_ids"].numel())

    def on_validation_epoch_start(self):
        self.val_memory.reset()  # validation reads its streams from the start each time

    def validation_step(self, batch, batch_idx):
        loss, logits = self._xl_loss(batch, self.val_memory)
        labels = batch["labels"]
        n = (labels != -100).sum()
        self.log("val/loss", loss, on_epoch=True, prog_bar=True, batch_size=int(n), sync_dist=True)
        return loss, logits, labels

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        # each rank has its own streams and memory, and only rank 0 writes: keep the memory only when it is
        # the whole state (one process); a multi-process resume starts its memory empty
        world = self.trainer.world_size if self._trainer is not None else 1
        checkpoint["xl_memory"] = self.train_memory.state() if world == 1 else None

    def on_load_checkpoint(self, checkpoint):
        state = checkpoint.get("xl_memory")
        if state is not None:
            self.train_memory.load(state, self.device)

    def on_train_start(self):
        # a memory restored from a checkpoint was read before the module reached its device
        if self.train_memory.layers is not None:
            self.train_memory.layers = [m.to(self.device) for m in self.train_memory.layers]
