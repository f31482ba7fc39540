"""CIFAR-10 and CIFAR-100: the official "python version" archives (Krizhevsky 2009).

Each batch file is a pickled dict: ``data`` (N x 3072 uint8: the red, green, blue planes of a
32 x 32 image) and ``labels`` (CIFAR-10) or ``fine_labels`` (CIFAR-100). Files are read from the
archive itself, from its extracted folder, or from a folder that holds the batch files directly.

Pickles can run code when loaded, so they are read with an unpickler that only admits the few
globals a numpy array needs; anything else is reported as a malformed file.
"""

from __future__ import annotations

import importlib
import io
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .core import DataError, TensorSplit
from .files import obstacle, read_bytes

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


@dataclass(frozen=True)
class Variant:
    archive: str
    folder: str
    train: tuple[str, ...]
    test: str
    label_key: str
    meta: str
    names_key: str
    num_classes: int


VARIANTS = {
    "cifar10": Variant(
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch",
        "labels",
        "batches.meta",
        "label_names",
        10,
    ),
    "cifar100": Variant(
        "cifar-100-python.tar.gz",
        "cifar-100-python",
        ("train",),
        "test",
        "fine_labels",
        "meta",
        "fine_label_names",
        100,
    ),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        if module == "numpy.core.multiarray":  # written by numpy 1.x; numpy 2 moved it
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return getattr(importlib.import_module(module), name)


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as error:  # any failure to parse means a malformed file
        raise DataError(
            f"{where}: not a CIFAR batch file ({type(error).__name__}: {error})"
        ) from None
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: not a CIFAR batch file (holds a {type(obj).__name__}, not a dict)"
        )
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _locate(variant: Variant, directory: Path) -> tuple[Path | None, Path | None]:
    """(folder holding the batch files, archive): the folder wins when both exist."""
    for folder in (directory / variant.folder, directory):
        if (folder / variant.test).is_file():
            return folder, None
    archive = directory / variant.archive
    return None, (archive if archive.is_file() else None)


class _Source:
    """Batch files by name, from a .tar.gz archive or a folder."""

    def __init__(self, variant: Variant, directory: Path):
        self.variant = variant
        self.folder, self.archive = _locate(variant, directory)
        if self.folder is None and self.archive is None:
            raise DataError(f"{directory}: neither {variant.archive} nor {variant.folder}/ found")
        self.members: dict[str, bytes] = {}
        if self.archive is not None:
            self._read_archive()

    def _read_archive(self):
        wanted = (*self.variant.train, self.variant.test, self.variant.meta)
        try:
            with tarfile.open(self.archive, "r:gz") as tar:
                for member in tar:
                    name = member.name.rsplit("/", 1)[-1]
                    if member.isfile() and name in wanted:
                        self.members[name] = tar.extractfile(member).read()
        except (tarfile.TarError, OSError, EOFError, zlib.error) as error:
            raise DataError(f"{self.archive}: corrupt or truncated archive ({error})") from None

    def names(self) -> list[str]:
        """The training batches there; a gap (data_batch_3 absent, data_batch_4 present) is an
        error, while the first k batches alone are a smaller data set of the same format."""
        if self.folder is not None:
            for name in self.variant.train:
                found = obstacle(self.folder / name)
                if found:
                    raise DataError(f"{self.folder / name} is {found}, not a CIFAR batch file")
            names = [n for n in self.variant.train if (self.folder / n).is_file()]
        else:
            names = [n for n in self.variant.train if n in self.members]
        expected = self.variant.train[: self.variant.train.index(names[-1]) + 1] if names else ()
        missing = [n for n in expected if n not in names]
        if missing:
            batches = "batch " if len(missing) == 1 else "batches "
            raise DataError(
                f"{self.archive or self.folder}: training {batches}{', '.join(missing)} "
                f"{'is' if len(missing) == 1 else 'are'} missing (found {', '.join(names)}): the "
                "files are incomplete; download them again"
            )
        return names

    def read(self, name: str) -> tuple[bytes, str] | None:
        if self.folder is not None:
            path = self.folder / name
            return (read_bytes(path), str(path)) if path.is_file() else None
        if name in self.members:
            return self.members[name], f"{self.archive} (member {name})"
        return None


def _batch(source: _Source, name: str) -> tuple[np.ndarray, np.ndarray]:
    found = source.read(name)
    if found is None:
        raise DataError(f"{source.archive or source.folder}: batch file {name!r} not found")
    raw, where = found
    batch = _unpickle(raw, where)
    key = source.variant.label_key
    if "data" not in batch or key not in batch:
        raise DataError(
            f"{where}: a CIFAR batch needs the keys 'data' and {key!r}; found {sorted(batch)}"
        )
    data, labels = batch["data"], np.asarray(batch[key])
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        shape = getattr(data, "shape", None)
        raise DataError(
            f"{where}: 'data' must be an N x 3072 uint8 array; got {type(data).__name__} {shape}"
        )
    if labels.shape != (len(data),):
        raise DataError(f"{where}: {len(data)} images but {labels.size} labels")
    if labels.size and labels.dtype.kind not in "iu":  # a float or bool label is not a class
        raise DataError(f"{where}: labels must be integers (class indices); got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() >= source.variant.num_classes):
        raise DataError(f"{where}: labels must lie in 0..{source.variant.num_classes - 1}")
    return data, labels


def load(directory: Path, name: str) -> tuple[TensorSplit, TensorSplit, tuple[str, ...]]:
    """(train, test, class names) of ``name`` ("cifar10" or "cifar100") found in ``directory``."""
    variant = VARIANTS[name]
    source = _Source(variant, Path(directory))
    train_names = source.names()
    if not train_names:
        raise DataError(
            f"{source.archive or source.folder}: no training batch ({', '.join(variant.train)})"
        )
    train = [_batch(source, n) for n in train_names]
    test = _batch(source, variant.test)
    if not sum(len(d) for d, _ in train):
        raise DataError(f"{source.archive or source.folder}: the training split is empty "
                        f"({', '.join(train_names)} hold 0 images)")
    if not len(test[0]):
        raise DataError(f"{source.archive or source.folder}: the test split is empty "
                        f"({variant.test} holds 0 images)")

    def split(parts):
        data = np.concatenate([d for d, _ in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([y for _, y in parts]).astype(np.int64)
        return TensorSplit(torch.from_numpy(data), torch.from_numpy(labels))

    classes: tuple[str, ...] = ()
    meta = source.read(variant.meta)
    if meta is not None:
        names = _unpickle(meta[0], meta[1]).get(variant.names_key, [])
        classes = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
    return split(train), split([test]), classes


def present(directory: Path, name: str) -> bool:
    """True when ``directory`` holds the archive or the extracted batch files of ``name``."""
    return _locate(VARIANTS[name], Path(directory)) != (None, None)
