"""ImageNet-style folder trees: ``ROOT/train/<class>/*.jpg`` and ``ROOT/val/<class>/*.jpg``.

Images are decoded with Pillow when a batch asks for them (a tree can hold millions of files),
converted to RGB, resized so that the shorter side is 8/7 of ``image_size`` (256 for 224, the
usual ImageNet evaluation) and center-cropped to ``image_size`` x ``image_size``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .core import DataError

EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
TRAIN_NAMES = ("train",)
TEST_NAMES = ("val", "validation", "test")
# The usual ImageNet statistics: computing them would mean decoding the whole tree.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode(path: Path, size: int) -> torch.Tensor:
    """The image at ``path`` as a (3, size, size) uint8 tensor."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
            scale = round(size * 8 / 7) / min(image.size)
            width, height = (max(size, round(d * scale)) for d in image.size)
            image = image.resize((width, height), Image.BILINEAR)
            left, top = (width - size) // 2, (height - size) // 2
            image = image.crop((left, top, left + size, top + size))
            array = np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{path}: cannot decode image ({error})") from None
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


class FolderSplit(Dataset):
    """Image files with their class indices, decoded on access."""

    def __init__(self, paths: list[Path], labels: list[int], size: int):
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.long)
        self.size = size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return decode(self.paths[index], self.size), self.labels[index]

    def __getitems__(self, indices):
        images = torch.stack([decode(self.paths[i], self.size) for i in indices])
        return images, self.labels[torch.as_tensor(indices, dtype=torch.long)]

    def head(self, n: int | None) -> FolderSplit:
        if n is None or n >= len(self):
            return self
        return FolderSplit(self.paths[:n], self.labels[:n].tolist(), self.size)


def split_dirs(root: Path) -> tuple[Path | None, Path | None]:
    """(training folder, test folder) of ``root``, None for one that is absent."""
    train = next((root / n for n in TRAIN_NAMES if (root / n).is_dir()), None)
    test = next((root / n for n in TEST_NAMES if (root / n).is_dir()), None)
    return train, test


def _scan(directory: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        folder = directory / name
        if not folder.is_dir():
            continue
        files = sorted(
            p for p in folder.iterdir() if p.suffix.lower() in EXTENSIONS and p.is_file()
        )
        paths += files
        labels += [label] * len(files)
    return paths, labels


def load(root: Path, size: int) -> tuple[FolderSplit, FolderSplit, tuple[str, ...]]:
    """(train, test, class names) of the tree at ``root``; classes are the sorted folder names."""
    root = Path(root)
    train_dir, test_dir = split_dirs(root)
    if train_dir is None or test_dir is None:
        raise DataError(
            f"{root}: an image folder data set needs a train/ folder and a val/ (or test/) folder, "
            "each with one sub-folder of images per class"
        )
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{train_dir}: no class folders")
    extra = sorted(p.name for p in test_dir.iterdir() if p.is_dir() and p.name not in classes)
    if extra:
        raise DataError(
            f"{test_dir}: class folder(s) {', '.join(extra[:5])} have no training folder"
        )
    splits = []
    for directory in (train_dir, test_dir):
        paths, labels = _scan(directory, classes)
        if not paths:
            kinds = "/".join(sorted(EXTENSIONS))
            raise DataError(f"{directory}: no image files ({kinds}) in its class folders")
        splits.append(FolderSplit(paths, labels, size))
    return splits[0], splits[1], tuple(classes)
