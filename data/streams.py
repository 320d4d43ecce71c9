"""Contiguous streams for recurrent models (Transformer-XL): batch t holds segment t of B streams.

The token stream (documents joined by <eos>) is cut into world_size x B equal contiguous parts; rank r
reads parts r*B ... r*B + B-1, one per batch row. Batch t gives each row the seq_len tokens that follow
the ones of batch t-1, so a memory carried across batches holds the real preceding text. Every part has
the same number of segments, so all rows restart together: the first batch of each epoch (and only it)
carries `reset = True`, where a recurrent task drops its memory. The position (epoch, segments done)
is the loader state saved in checkpoints: a resumed run continues the streams at the next segment.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from data.loading import ResumableBatchSampler, ResumableLoader, collate
from data.modules import _CorpusDataModule


class StreamSegments(Dataset):
    """`rows` contiguous parts of `stream[offset:]`, each `n_segments * seg_len` tokens (+1 for the
    last label). Item (epoch, row, t): segment t of part `row` with its next-token labels."""

    def __init__(self, stream: np.ndarray, seg_len: int, rows: int, row_offset: int, total_rows: int):
        self.stream, self.seg_len, self.rows, self.row_offset = stream, seg_len, rows, row_offset
        self.part_len = (len(stream) - 1) // total_rows  # the last label of a part is the next part's first token
        self.n_segments = self.part_len // seg_len
        if self.n_segments < 1:
            raise ValueError(f"a stream part of {self.part_len} tokens is shorter than one segment "
                             f"(data.seq_len={seg_len}): lower data.batch_size or data.seq_len, or use a larger corpus")

    def truncate(self, n_segments: int) -> None:
        self.n_segments = min(self.n_segments, n_segments)

    def start(self, row: int, t: int) -> int:
        return (self.row_offset + row) * self.part_len + t * self.seg_len

    def __getitem__(self, key):
        epoch, row, t = key
        s = self.start(row, t)
        w = torch.from_numpy(np.array(self.stream[s: s + self.seg_len + 1], dtype=np.int64))
        return {"input_ids": w[:-1], "labels": w[1:], "reset": torch.tensor(t == 0), "batch_number": t}


class StreamBatchSampler(ResumableBatchSampler):
    """Batch t = [(epoch, row, t) for every row]: in order, never shuffled (the order *is* the context).
    Inherits the resumable state (epoch, consumed) and Lightning's set_epoch hook."""

    def __init__(self, rows: int, n_segments: int):
        super().__init__(n_items=rows, batch_size=rows, shuffle=False, seed=0)
        self.rows, self.n_segments = rows, n_segments

    def __len__(self) -> int:
        return self.n_segments

    def __iter__(self):
        start = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            start = self._resume[1]
        self._resume = None
        self.consumed = start
        for t in range(start, self.n_segments):
            yield [(self.epoch, row, t) for row in range(self.rows)]


class StreamDataModule(_CorpusDataModule):
    """`data=streams`: contiguous segments of seq_len tokens, batch_size streams per rank."""

    def setup(self, stage=None):
        train, val, self.val_bytes_per_token = self.token_streams()
        rank, world = self._rank_world()
        b = self.batch_size
        self.train_set = StreamSegments(train, self.seq_len, b, rank * b, world * b)
        self.val_set = StreamSegments(val, self.seq_len, b, rank * b, world * b)
        self._cap_val()

    def _cap_val(self) -> None:
        if self.max_val_batches:
            self.val_set.truncate(self.max_val_batches)

    def _loader(self, dataset, shuffle: bool):
        sampler = StreamBatchSampler(dataset.rows, dataset.n_segments)
        loader = ResumableLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers, collate_fn=collate,
                                 persistent_workers=self.num_workers > 0,
                                 generator=torch.Generator().manual_seed(self.seed))
        return loader, sampler
