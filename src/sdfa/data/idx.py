"""MNIST and Fashion-MNIST: the IDX format (LeCun et al.), gzip-compressed or not.

An IDX file is a big-endian header -- two zero bytes, a type code (0x08: unsigned byte), the
number of dimensions, one 32-bit size per dimension -- followed by the values in C order. Images
have magic 0x00000803 (2051, three dimensions), labels 0x00000801 (2049, one dimension).
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from .core import DataError, TensorSplit
from .files import read_bytes

UBYTE = 0x08
IMAGES, LABELS = 3, 1  # number of dimensions
KIND = {IMAGES: "image", LABELS: "label"}
SPLITS = {"train": "train", "test": "t10k"}


def file_names(split: str) -> tuple[str, str]:
    """The official (images, labels) file names of ``split`` without the .gz suffix."""
    prefix = SPLITS[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """The array stored in the IDX file ``path`` (gzip is detected from the content).

    Raises:
        DataError: unreadable gzip, wrong magic number, or a size that disagrees with the header.
    """
    raw = read_bytes(path)
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as error:
            raise DataError(f"{path}: corrupt or truncated gzip data ({error})") from None
    expected = bytes([0, 0, UBYTE, ndim])
    if raw[:4] != expected:
        raise DataError(
            f"{path}: wrong magic number 0x{raw[:4].hex() or 'empty'}; an IDX {KIND[ndim]} file "
            f"starts with 0x{expected.hex()}"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated inside the header ({len(raw)} bytes)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    size = math.prod(dims)
    body = len(raw) - header
    if body != size:
        fault = "truncated" if body < size else "longer than its header says"
        raise DataError(
            f"{path}: {fault}: the header announces {' x '.join(map(str, dims))} values "
            f"({size} bytes) but the file holds {body}"
        )
    return np.frombuffer(raw, dtype=np.uint8, count=size, offset=header).reshape(dims)


def find(directory: Path, name: str) -> Path | None:
    """``name``.gz or ``name`` in ``directory``, whichever exists."""
    for candidate in (directory / f"{name}.gz", directory / name):
        if candidate.is_file():
            return candidate
    return None


def load_split(
    directory: Path, split: str, num_classes: int = 10, size: tuple[int, int] | None = None
) -> TensorSplit:
    """One split of an MNIST-format data set in ``directory`` (any number of samples, at least
    one); ``size``: the (height, width) its images must have (the model is built for it)."""
    names = file_names(split)
    paths = [find(directory, name) for name in names]
    for name, path in zip(names, paths, strict=True):
        if path is None:
            raise DataError(f"{directory / (name + '.gz')}: file not found")
    images = read_idx(paths[0], IMAGES)
    labels = read_idx(paths[1], LABELS)
    if len(images) != len(labels):
        raise DataError(
            f"{paths[0]} holds {len(images)} images but {paths[1]} holds {len(labels)} labels"
        )
    if not len(images):
        raise DataError(f"{paths[0]}: the {split} split is empty (0 images)")
    if size is not None and images.shape[1:] != tuple(size):
        raise DataError(
            f"{paths[0]}: images of {' x '.join(map(str, images.shape[1:]))} pixels; this data "
            f"set's are {' x '.join(map(str, size))}"
        )
    if labels.size and labels.max() >= num_classes:
        raise DataError(f"{paths[1]}: label {labels.max()} is out of range 0..{num_classes - 1}")
    return TensorSplit(
        torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
    )
