"""What every data set turns into: image tensors with labels, and the per-batch transforms.

Images stay in their stored integer form (uint8, or digits' 0..16) until a batch is used, so
CIFAR-10 takes 150 MB instead of 600 MB of float32; :func:`prepare_batch` scales, augments and
normalizes each batch on the training device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset


class DataError(ValueError):
    """A data file is missing, truncated or malformed (the message names the file and the fault)."""


class TensorSplit(Dataset):
    """A split held in memory: ``images`` (N, C, H, W), integer valued, and ``labels`` (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        if len(images) != len(labels):
            raise DataError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]

    def __getitems__(self, indices):
        """A whole batch in one indexing operation (torch's DataLoader calls this when present)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.labels[index]

    def head(self, n: int | None) -> TensorSplit:
        """The first ``n`` samples (the official files are already in random order)."""
        return (
            self if n is None or n >= len(self) else TensorSplit(self.images[:n], self.labels[:n])
        )


@dataclass
class ImageData:
    """A loaded data set: two splits plus what is needed to feed them to a model."""

    name: str
    train: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    value_range: float = 255.0  # stored value of a white pixel
    augment: bool = False  # whether the usual augmentation is on by default
    classes: tuple[str, ...] = ()


def channel_stats(images: torch.Tensor, value_range: float) -> tuple[tuple, tuple]:
    """Per-channel mean and standard deviation of ``images`` scaled to [0, 1].

    Computed from the training split that is actually loaded (for the official files these are
    the usual constants, e.g. 0.1307 / 0.3081 for MNIST), in chunks to bound memory.
    """
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.double() / value_range
        total += x.sum(dim=(0, 2, 3))
        total_sq += (x * x).sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def random_crop_flip(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, per image (CIFAR's usual).

    Draws from ``generator`` (on the CPU), so a seeded run sees the same augmentations again.
    """
    n, c, h, w = x.shape
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator).to(x.device)
    flips = (torch.rand(n, generator=generator) < 0.5).to(x.device)
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    rows = (offsets[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = offsets[1][:, None] + torch.arange(w, device=x.device)
    cols = torch.where(flips[:, None], cols.flip(1), cols)[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def prepare_batch(
    images: torch.Tensor,
    data: ImageData,
    *,
    augment: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Stored images -> normalized float32 model input (augmented when ``augment``)."""
    x = images.float()
    if augment:  # padding 4 for CIFAR's 32 x 32, scaled for other sizes
        x = random_crop_flip(x, padding=max(1, x.shape[-1] // 8), generator=generator)
    mean = torch.tensor(data.mean, device=x.device).view(1, -1, 1, 1) * data.value_range
    std = torch.tensor(data.std, device=x.device).view(1, -1, 1, 1) * data.value_range
    return (x - mean) / std
