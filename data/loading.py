"""A resumable, rank-aware batch order: a pure function of (seed, epoch, rank), with its position
saved in Lightning checkpoints so an interrupted run resumes on the exact next batch. Ranks split each
global batch between them, so a data-parallel run trains on the batches of a single-process run."""
from __future__ import annotations

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader


class ResumableBatchSampler:
    """Yields lists of (epoch, index, batch_number) triples: datasets use the epoch to seed per-item
    randomness (MLM masking), so an item looks the same whichever worker or resumed run produces it;
    the batch number travels with the batch so that the position saved is that of the last batch
    *trained on*, not the last one fetched (Lightning fetches ahead)."""

    def __init__(self, n_items: int, batch_size: int, shuffle: bool, seed: int, rank: int = 0, world: int = 1):
        if n_items < batch_size * world:
            raise ValueError(
                f"data has {n_items} examples, fewer than one batch (data.batch_size={batch_size} x {world} ranks): "
                "lower data.batch_size or data.seq_len, or use a larger corpus"
            )
        self.n_items, self.batch_size, self.shuffle, self.seed = n_items, batch_size, shuffle, seed
        self.rank, self.world = rank, world
        self.epoch = 0
        self._resume = None  # (epoch, batches already trained) from a checkpoint
        self.consumed = 0  # batches of self.epoch trained on, set by the data module
        self.sampler = self  # Lightning calls batch_sampler.sampler.set_epoch(epoch) at each epoch start

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at each epoch start
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_items // self.world // self.batch_size

    def __iter__(self):
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n_items, generator=g)
        else:
            order = torch.arange(self.n_items)
        # global batch b is order[b * G : (b + 1) * G] with G = batch_size * world, and rank r trains on its r-th
        # slice: N ranks with batch_size B see exactly the batches of one process with batch_size N * B
        g = self.batch_size * self.world
        order = order[: len(self) * g].view(len(self), self.world, self.batch_size)[:, self.rank].reshape(-1).tolist()
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        self.consumed = start
        for b in range(start, len(self)):
            yield [(self.epoch, i, b) for i in order[b * self.batch_size : (b + 1) * self.batch_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self._resume = (state["epoch"], state["consumed"])


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning recognises as stateful (state_dict / load_state_dict)."""

    def state_dict(self) -> dict:
        return self.batch_sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.batch_sampler.load_state_dict(state)


def collate(items):
    return {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in items[0]}


class ResumableDataModule(pl.LightningDataModule):
    """The loader plumbing every zoo data module shares: rank-aware resumable batches, each loader with a
    generator of its own, and the trained-on position recorded for checkpoints. Subclasses set
    `batch_size`, `seed`, `num_workers`, and build `train_set` / `val_set` in setup()."""

    _train_sampler: ResumableBatchSampler | None = None

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def _loader(self, dataset, shuffle: bool):
        rank, world = self._rank_world()
        sampler = ResumableBatchSampler(len(dataset), self.batch_size, shuffle, self.seed, rank, world)
        # a generator of its own: a DataLoader draws its workers' base seed at every iter() from the generator it
        # has, else from the global RNG, which would shift the dropout of a resumed run (its iterators start later)
        loader = ResumableLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers,
                                 collate_fn=collate, persistent_workers=self.num_workers > 0,
                                 generator=torch.Generator().manual_seed(self.seed))
        return loader, sampler

    def train_dataloader(self):
        loader, self._train_sampler = self._loader(self.train_set, shuffle=True)
        return loader

    def val_dataloader(self):
        return self._loader(self.val_set, shuffle=False)[0]

    def on_before_batch_transfer(self, batch, dataloader_idx):
        # the position saved in a checkpoint is that of the last batch trained on, not the last one fetched
        pos = batch.pop("batch_number")
        if self.trainer is not None and self.trainer.training and self._train_sampler is not None:
            self._train_sampler.consumed = int(pos[0]) + 1
        return batch
