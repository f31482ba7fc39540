"""Resumable data loading: batches whose order depends only on (seed, epoch)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


class EpochBatches(Sampler):
    """Batches of indices whose order depends only on (seed, epoch): resumable by epoch alone."""

    def __init__(self, size: int, batch_size: int, *, seed: int = 0, shuffle: bool = False):
        self.size, self.batch_size, self.seed, self.shuffle = size, batch_size, seed, shuffle
        self.epoch = 0
        # Training drops the last incomplete batch (a batch of one breaks BatchNorm), unless the
        # whole split is smaller than a batch.
        self.drop_last = shuffle and size >= batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        if self.shuffle:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**64)
            order = torch.randperm(self.size, generator=gen).tolist()
        else:
            order = list(range(self.size))
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size]

    def __len__(self):
        full, rest = divmod(self.size, self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)


def keep_batch(batch):
    """collate_fn for splits that return whole batches (``__getitems__``)."""
    return batch


def epoch_loader(split, batch_size: int, *, seed: int, shuffle: bool, workers: int = 0,
                 pin_memory: bool = False) -> DataLoader:
    """A DataLoader over :class:`EpochBatches` of ``split``."""
    if len(split) == 0:
        raise ValueError("a data split is empty: there is nothing to train on or to measure")
    return DataLoader(
        split,
        batch_sampler=EpochBatches(len(split), batch_size, seed=seed, shuffle=shuffle),
        collate_fn=keep_batch,
        num_workers=workers,
        pin_memory=pin_memory,
        generator=torch.Generator(),  # keeps DataLoader from drawing on the global RNG
    )
