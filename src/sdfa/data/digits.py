"""scikit-learn's handwritten digits: 1797 real 8 x 8 images with values 0..16, shipped with
scikit-learn, so there is always a real data set to train on without a download."""

from __future__ import annotations

import numpy as np
import torch

from .core import TensorSplit

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the split is part of the data set, not of a run: the same for every seed


def load() -> tuple[TensorSplit, TensorSplit]:
    """A fixed stratified split: 1437 training and 360 test images, stored as uint8 0..16."""
    from sklearn.datasets import load_digits  # imported here: scikit-learn takes seconds to load
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.uint8)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(
        images,
        digits.target,
        test_size=TEST_FRACTION,
        random_state=SPLIT_SEED,
        stratify=digits.target,
    )
    return (
        TensorSplit(torch.from_numpy(x_train), torch.from_numpy(y_train)),
        TensorSplit(torch.from_numpy(x_test), torch.from_numpy(y_test)),
    )
