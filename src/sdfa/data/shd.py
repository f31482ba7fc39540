"""The Spiking Heidelberg Digits (SHD; Cramer, Stradmann, Schemmel, Zenke 2020): spoken digits
as spike trains of 700 cochlea channels, 20 classes (German and English 0-9), 8156 / 2264.

Read from ``--data-dir``: ``shd_train.h5`` and ``shd_test.h5`` (or their ``.gz``, as published
at https://zenkelab.org/datasets). HDF5 (``h5py``): ``spikes/times`` (seconds) and
``spikes/units`` (channel ids) as variable-length arrays per sample, and ``labels``. When the
folder holds the ``md5sums.txt`` that is published with them, every file is checked against
it (we found no checksum we could confirm as the official one, so none is built in).

Each sample is binned into ``STEPS`` steps of 10 ms (the first second; spikes after it are
dropped) and stored as spike counts (N, 1, STEPS, 700) uint8: one time step per row, as the
other series (BasicMotions), which spiking presets read with ``coding="series"``.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import torch

from .core import DataError, TensorSplit

CHANNELS, CLASSES, STEPS, DURATION = 700, 20, 100, 1.0
SPLITS = ("train", "test")


def find(directory: Path, split: str) -> Path | None:
    for name in (f"shd_{split}.h5", f"shd_{split}.h5.gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def present(directory: Path) -> bool:
    return all(find(directory, s) is not None for s in SPLITS)


def _check_md5(path: Path) -> None:
    sums = path.parent / "md5sums.txt"
    if not sums.is_file():
        return
    table = dict(reversed(line.split()[:2]) for line in sums.read_text().splitlines()
                 if len(line.split()) >= 2)
    expected = table.get(path.name)
    if expected is None:
        return
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    if digest.hexdigest() != expected:
        raise DataError(f"{path}: MD5 {digest.hexdigest()} differs from {expected} in {sums}; "
                        "the file is damaged or not the published one: download it again")


def load_split(path: Path, steps: int = STEPS) -> TensorSplit:
    try:
        import h5py
    except ImportError as err:
        raise DataError("reading SHD needs h5py: pip install 'sdfa[spiking]'") from err
    _check_md5(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as raw, h5py.File(raw, "r") as f:
            times, units = f["spikes"]["times"][:], f["spikes"]["units"][:]
            labels = np.asarray(f["labels"][:], dtype=np.int64)
    except (OSError, KeyError) as err:
        raise DataError(f"{path}: not an SHD HDF5 file ({err})") from None
    if len(times) != len(labels) or len(units) != len(labels):
        raise DataError(f"{path}: {len(times)} spike trains but {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= CLASSES):
        raise DataError(f"{path}: labels must be class indices 0..{CLASSES - 1}")
    counts = np.zeros((len(labels), 1, steps, CHANNELS), dtype=np.uint8)
    for i, (t, u) in enumerate(zip(times, units)):
        t, u = np.asarray(t, dtype=np.float64), np.asarray(u, dtype=np.int64)
        keep = (t >= 0) & (t < DURATION) & (u >= 0) & (u < CHANNELS)
        bins = (t[keep] / DURATION * steps).astype(np.int64)
        np.add.at(counts[i, 0], (bins, u[keep]), 1)
    return TensorSplit(torch.from_numpy(counts), torch.from_numpy(labels))


def load(directory: Path) -> tuple[TensorSplit, TensorSplit]:
    return tuple(load_split(find(directory, s)) for s in SPLITS)
