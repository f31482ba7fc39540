"""Data loaders on small files written in each real format: good, subset, truncated, corrupt,
wrong magic; downloads with checksum verification; the batch transforms."""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import re
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sdfa import data as sdfa_data
from sdfa.app.cli import main
from sdfa.data import DataError, idx, load_dataset, prepare_batch, random_crop_flip
from sdfa.data.files import RemoteFile, download
from sdfa.distributed.launch import free_port

RNG = np.random.default_rng(0)


# -- writers for the real formats --------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(directory, n_train=20, n_test=10, compress=True, sizes=(28, 28)):
    """MNIST-format files with ``n_train`` / ``n_test`` samples of ``sizes`` (train, test)
    pixels square; returns the arrays written."""
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n, size in (("train", n_train, sizes[0]), ("t10k", n_test, sizes[1])):
        images = RNG.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = RNG.integers(0, 10, n, dtype=np.uint8)
        for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
            raw = idx_bytes(array)
            name = f"{prefix}-{kind}-ubyte"
            if compress:
                (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (directory / name).write_bytes(raw)
        arrays[prefix] = (images, labels)
    return arrays


def cifar_batch(n, label_key="labels", classes=10) -> dict:
    data = RNG.integers(0, 256, (n, 3072), dtype=np.uint8)
    labels = RNG.integers(0, classes, n).tolist()
    return {b"batch_label": b"test", label_key.encode(): labels, b"data": data}


def write_cifar_archive(path, folder, members: dict[str, bytes]):
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(f"{folder}/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))


def cifar10_members(n_batches=5, per_batch=8, n_test=6):
    members = {f"data_batch_{i}": pickle.dumps(cifar_batch(per_batch), protocol=2)
               for i in range(1, n_batches + 1)}
    members["test_batch"] = pickle.dumps(cifar_batch(n_test), protocol=2)
    names = [n.encode() for n in "airplane automobile bird cat deer dog frog horse ship".split()]
    members["batches.meta"] = pickle.dumps({b"label_names": names}, protocol=2)
    return members


# -- MNIST / Fashion-MNIST ---------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_subset_loads(tmp_path, name, compress):
    arrays = write_mnist(tmp_path, compress=compress)
    data = load_dataset(name, tmp_path)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.train) == 20 and len(data.test) == 10
    images, labels = arrays["train"]
    assert torch.equal(data.train.images[:, 0], torch.from_numpy(images))
    assert torch.equal(data.train.labels, torch.from_numpy(labels.astype(np.int64)))
    assert data.mean[0] == pytest.approx(images.mean() / 255, rel=1e-6)


def test_idx_truncated_gzip(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: corrupt or truncated gzip"):
        load_dataset("mnist", tmp_path)


def test_idx_truncated_body(tmp_path):
    write_mnist(tmp_path, compress=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    expected = (r"t10k-images-idx3-ubyte: truncated: the header announces 10 x 28 x 28 values "
                r"\(7840 bytes\) but the file holds 7740")
    with pytest.raises(DataError, match=expected):
        load_dataset("mnist", tmp_path)


def test_idx_corrupt_gzip(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    raw = bytearray(path.read_bytes())
    raw[12:20] = b"\xff" * 8
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: corrupt or truncated gzip"):
        load_dataset("mnist", tmp_path)


def test_idx_wrong_magic(tmp_path):
    write_mnist(tmp_path)
    labels = (tmp_path / "train-labels-idx1-ubyte.gz").read_bytes()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(labels)  # a label file in its place
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: wrong magic number "
                                        r"0x00000801; an IDX image file starts with 0x00000803"):
        load_dataset("mnist", tmp_path)


def test_idx_counts_disagree(tmp_path):
    write_mnist(tmp_path)
    labels = RNG.integers(0, 10, 7, dtype=np.uint8)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataError, match="holds 20 images but .* holds 7 labels"):
        load_dataset("mnist", tmp_path)


def test_missing_data_says_what_to_download(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "--download" in message
    for remote in sdfa_data.DATASETS["mnist"].files:
        assert remote.urls[0] in message and remote.md5 in message


def test_missing_file_is_named(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError) as info:
        load_dataset("mnist", tmp_path)
    message = str(info.value)
    assert f"in {tmp_path} is incomplete: t10k-labels-idx1-ubyte.gz not found." in message
    assert "t10k-labels-idx1-ubyte.gz  (MD5 ec29112dd5afa0611ce80d1b7f02629c)" in message
    assert "train-images" not in message  # only the absent file is to be downloaded


def test_cli_reports_bad_file_in_one_line(tmp_path, capsys):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b garbage")
    assert main(["train", "--dataset", "mnist", "--data-dir", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdfa train: error: ") and "t10k-labels-idx1-ubyte.gz" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("sizes, wrong", [((28, 14), "t10k"), ((14, 14), "train")])
def test_idx_images_of_another_size_are_refused_at_load(tmp_path, capsys, sizes, wrong):
    write_mnist(tmp_path / "data", sizes=sizes)
    message = (f"{tmp_path / 'data' / wrong}-images-idx3-ubyte.gz: images of 14 x 14 pixels; "
               "this data set's are 28 x 28")
    with pytest.raises(DataError, match=re.escape(message)):
        load_dataset("mnist", tmp_path / "data")
    out = tmp_path / "run"
    args = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "data"), "--quiet"]
    assert main([*args, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"sdfa train: error: {message}\n"
    assert not out.exists()  # refused before any training


@pytest.mark.parametrize("split, counts", [("train", (0, 10)), ("test", (20, 0))])
def test_idx_empty_split_is_named(tmp_path, split, counts):
    write_mnist(tmp_path, *counts)
    prefix = idx.SPLITS[split]
    with pytest.raises(DataError, match=re.escape(
            f"{tmp_path / prefix}-images-idx3-ubyte.gz: the {split} split is empty (0 images)")):
        load_dataset("fashion-mnist", tmp_path)


def test_a_folder_or_broken_link_in_place_of_a_file_is_said(tmp_path):
    write_mnist(tmp_path)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    labels.unlink()
    labels.mkdir()
    for fetch in (False, True):  # no download can fix it
        with pytest.raises(DataError) as info:
            load_dataset("mnist", tmp_path, download=fetch)
        assert str(info.value) == (f"{labels} is a folder, not a data file: put the official "
                                   "file there instead")
    labels.rmdir()
    labels.symlink_to(tmp_path / "gone.gz")
    with pytest.raises(DataError, match=re.escape(
            f"{labels} is a broken symbolic link (to {tmp_path / 'gone.gz'}), not a data file")):
        load_dataset("mnist", tmp_path)
    assert "not a data file" in sdfa_data.missing_message("mnist", tmp_path)  # sdfa reproduce
    (tmp_path / "file").write_text("")
    with pytest.raises(DataError, match=re.escape(
            f"{tmp_path / 'file'} is a file, not a folder of mnist files")):
        load_dataset("mnist", tmp_path / "file")


def test_unreadable_file_is_named(tmp_path, monkeypatch):
    write_mnist(tmp_path)
    real = Path.read_bytes

    def read_bytes(path):
        if path.name.startswith("t10k-labels"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)  # as root, chmod would not stop it
    with pytest.raises(DataError, match=re.escape(
            f"{tmp_path / 't10k-labels-idx1-ubyte.gz'}: cannot read it (Permission denied)")):
        load_dataset("mnist", tmp_path)


def test_digits_refuses_a_data_dir(tmp_path, capsys):
    with pytest.raises(ValueError, match="'digits' is embedded in scikit-learn and reads no files"):
        load_dataset("digits", tmp_path)
    assert main(["train", "--data-dir", str(tmp_path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sdfa train: error: data set 'digits' is embedded")
    assert len(err.strip().splitlines()) == 1


# -- CIFAR-10 / CIFAR-100 ----------------------------------------------------------------------


def test_cifar10_archive_and_folder(tmp_path):
    members = cifar10_members()
    write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    data = load_dataset("cifar10", tmp_path)
    assert len(data.train) == 40 and len(data.test) == 6 and data.input_shape == (3, 32, 32)
    assert data.classes[0] == "airplane" and data.num_classes == 10 and data.augment
    first = pickle.loads(members["data_batch_1"])
    assert torch.equal(data.train.images[0].flatten(), torch.from_numpy(first[b"data"][0]))
    assert data.train.labels[:8].tolist() == first[b"labels"]

    folder = tmp_path / "extracted" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name, raw in members.items():
        (folder / name).write_bytes(raw)
    extracted = load_dataset("cifar10", tmp_path / "extracted")
    assert torch.equal(extracted.train.images, data.train.images)


def test_cifar10_subset_of_batches(tmp_path):
    members = cifar10_members(n_batches=1)
    write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    assert len(load_dataset("cifar10", tmp_path).train) == 8


def test_cifar100(tmp_path):
    members = {
        "train": pickle.dumps(cifar_batch(12, "fine_labels", 100), protocol=2),
        "test": pickle.dumps(cifar_batch(5, "fine_labels", 100), protocol=2),
    }
    write_cifar_archive(tmp_path / "cifar-100-python.tar.gz", "cifar-100-python", members)
    data = load_dataset("cifar100", tmp_path)
    assert (len(data.train), len(data.test), data.num_classes) == (12, 5, 100)


def test_cifar_truncated_archive(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    write_cifar_archive(path, "cifar-10-batches-py", cifar10_members())
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz: corrupt or truncated archive"):
        load_dataset("cifar10", tmp_path)


def test_cifar_corrupt_batch(tmp_path):
    members = cifar10_members()
    members["test_batch"] = b"\x80\x02}q\x00garbage"
    write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    with pytest.raises(DataError, match=r"\(member test_batch\): not a CIFAR batch file"):
        load_dataset("cifar10", tmp_path)


def test_cifar_wrong_content(tmp_path):
    members = cifar10_members()
    wrong = {b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}
    members["data_batch_2"] = pickle.dumps(wrong)
    write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    with pytest.raises(DataError, match=r"data_batch_2\): 'data' must be an N x 3072 uint8 array"):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("labels, message", [
    (np.arange(8, dtype=np.float64) % 10, "labels must be integers (class indices); got float64"),
    ([0.0, 1.5] * 4, "labels must be integers (class indices); got float64"),
    ([True, False] * 4, "labels must be integers (class indices); got bool"),
    ([3] * 7 + [10], "labels must lie in 0..9"),
])
def test_cifar_labels_must_be_class_indices(tmp_path, labels, message):
    members = cifar10_members()
    batch = cifar_batch(8)
    batch[b"labels"] = labels
    members["data_batch_4"] = pickle.dumps(batch, protocol=2)
    write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    with pytest.raises(DataError, match=re.escape(f"(member data_batch_4): {message}")):
        load_dataset("cifar10", tmp_path)


@pytest.mark.parametrize("form", ["archive", "folder"])
def test_cifar_missing_batch_is_named(tmp_path, form):
    members = cifar10_members()
    del members["data_batch_3"]
    if form == "archive":
        where = tmp_path / "cifar-10-python.tar.gz"
        write_cifar_archive(where, "cifar-10-batches-py", members)
    else:
        where = tmp_path / "cifar-10-batches-py"
        where.mkdir()
        for name, raw in members.items():
            (where / name).write_bytes(raw)
    message = (f"{where}: training batch data_batch_3 is missing (found data_batch_1, "
               "data_batch_2, data_batch_4, data_batch_5)")
    with pytest.raises(DataError, match=re.escape(message)):
        load_dataset("cifar10", tmp_path)
    if form == "folder":  # a folder in place of the batch file is said as such
        (where / "data_batch_3").mkdir()
        with pytest.raises(DataError, match=re.escape(
                f"{where / 'data_batch_3'} is a folder, not a CIFAR batch file")):
            load_dataset("cifar10", tmp_path)


def test_cifar_archive_that_is_a_folder_is_said(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").mkdir()
    with pytest.raises(DataError, match=re.escape(
            f"{tmp_path / 'cifar-100-python.tar.gz'} is a folder, not a data file")):
        load_dataset("cifar100", tmp_path, download=True)


@pytest.mark.parametrize("split", ["train", "test"])
def test_cifar_empty_split_is_named(tmp_path, split):
    members = {
        "train": pickle.dumps(cifar_batch(0 if split == "train" else 4, "fine_labels", 100)),
        "test": pickle.dumps(cifar_batch(0 if split == "test" else 4, "fine_labels", 100)),
    }
    archive = tmp_path / "cifar-100-python.tar.gz"
    write_cifar_archive(archive, "cifar-100-python", members)
    name = "training" if split == "train" else "test"
    with pytest.raises(DataError, match=re.escape(
            f"{archive}: the {name} split is empty ({split} hold")):
        load_dataset("cifar100", tmp_path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_cifar_pickle_cannot_run_code(tmp_path):
    members = cifar10_members()
    members["test_batch"] = pickle.dumps({b"data": _Exploit(), b"labels": []}, protocol=2)
    write_cifar_archive(tmp_path / "cifar-10-python.tar.gz", "cifar-10-batches-py", members)
    with pytest.raises(DataError, match=r"unexpected object (posix|os|nt)\.system"):
        load_dataset("cifar10", tmp_path)


# -- image folders -----------------------------------------------------------------------------


def write_folder(root, classes=("cat", "dog"), per_class=3, size=(20, 14)):
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = np.full((size[1], size[0], 3), 40 * c + i, np.uint8)
                ext = "png" if i % 2 else "JPEG"
                Image.fromarray(pixels).save(folder / f"{i}.{ext.lower()}", format=ext)


def test_image_folder(tmp_path):
    write_folder(tmp_path)
    data = load_dataset("folder", tmp_path, image_size=8)
    assert data.classes == ("cat", "dog") and data.num_classes == 2
    assert data.input_shape == (3, 8, 8) and len(data.train) == 6 and len(data.test) == 6
    images, labels = data.train.__getitems__([0, 4])
    assert images.shape == (2, 3, 8, 8) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 1]
    assert images[0].float().mean().round() == 0 and images[1].float().mean().round() == 41


def test_image_folder_corrupt_image(tmp_path):
    write_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "9.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    data = load_dataset("folder", tmp_path, image_size=8)
    index = data.train.paths.index(bad)
    with pytest.raises(DataError, match=r"9\.jpg: cannot decode image"):
        data.train[index]


def test_image_folder_layout_errors(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="not found .* arrange the images as DIR/train/<class>/"):
        load_dataset("folder", tmp_path)
    (tmp_path / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no image files"):
        load_dataset("folder", tmp_path)
    with pytest.raises(DataError, match="needs --data-dir"):
        load_dataset("folder")


# -- digits, downloads, transforms -------------------------------------------------------------


def test_digits_split_is_fixed():
    data = load_dataset("digits")
    assert (len(data.train), len(data.test), data.input_shape) == (1437, 360, (1, 8, 8))
    assert torch.bincount(data.test.labels).min() >= 35  # stratified
    assert torch.equal(load_dataset("digits").test.labels, data.test.labels)
    resized = load_dataset("digits", image_size=32, train_samples=100)
    assert resized.input_shape == (1, 32, 32) and len(resized.train) == 100


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """``serve(folder)``: the base URL of a local HTTP server of the files in ``folder``."""
    servers = []

    def start(folder) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_checks_md5(tmp_path, serve):
    source = tmp_path / "src" / "file.gz"
    source.parent.mkdir()
    source.write_bytes(b"payload")
    md5 = hashlib.md5(b"payload").hexdigest()
    url = serve(source.parent) + "file.gz"
    good = download(RemoteFile("file.gz", (url,), md5), tmp_path / "cache")
    assert good.read_bytes() == b"payload"
    with pytest.raises(DataError, match="MD5 .* expected 0000"):
        download(RemoteFile("other.gz", (url,), "0" * 32), tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["file.gz"]


def test_download_tries_the_mirrors_in_order(tmp_path, serve):
    good, bad = tmp_path / "good", tmp_path / "bad"
    for folder, payload in ((good, b"payload"), (bad, b"tampered")):
        folder.mkdir()
        (folder / "file.gz").write_bytes(payload)
    md5 = hashlib.md5(b"payload").hexdigest()
    dead = f"http://127.0.0.1:{free_port()}/file.gz"  # nothing listens there
    corrupt, missing = serve(bad) + "file.gz", serve(good) + "absent.gz"
    remote = RemoteFile("file.gz", (dead, corrupt, missing, serve(good) + "file.gz"), md5)
    assert download(remote, tmp_path / "cache").read_bytes() == b"payload"

    remote = RemoteFile("file.gz", (dead, corrupt, missing), md5)
    with pytest.raises(DataError) as info:
        download(remote, tmp_path / "other")
    message = str(info.value)
    assert message.startswith(f"could not download file.gz: {dead}: ")
    assert f"; {corrupt}: MD5 {hashlib.md5(b'tampered').hexdigest()}, expected {md5}; " in message
    assert f"; {missing}: 404" in message and len(message.splitlines()) == 1
    assert list((tmp_path / "other").iterdir()) == []  # no partial download left


def test_a_complete_copy_is_not_downloaded_again(tmp_path):
    (tmp_path / "file.gz").write_bytes(b"payload")
    offline = f"http://127.0.0.1:{free_port()}/file.gz"
    remote = RemoteFile("file.gz", (offline,), hashlib.md5(b"payload").hexdigest())
    assert download(remote, tmp_path).read_bytes() == b"payload"


def _serve_mnist(tmp_path, monkeypatch, serve, url_of=lambda base, name: base + name):
    write_mnist(tmp_path / "mirror")
    spec = sdfa_data.DATASETS["mnist"]
    base = serve(tmp_path / "mirror")
    files = tuple(
        RemoteFile(f.name, (url_of(base, f.name),),
                   hashlib.md5((tmp_path / "mirror" / f.name).read_bytes()).hexdigest())
        for f in spec.files
    )
    monkeypatch.setitem(sdfa_data.DATASETS, "mnist", dataclasses.replace(spec, files=files))
    monkeypatch.setenv("SDFA_DATA", str(tmp_path / "cache"))
    return files


def test_download_then_load(tmp_path, monkeypatch, serve):
    files = _serve_mnist(tmp_path, monkeypatch, serve)
    with pytest.raises(DataError, match="was not found"):
        load_dataset("mnist")
    data = load_dataset("mnist", download=True)
    assert len(data.train) == 20 and (tmp_path / "cache" / "mnist" / files[0].name).exists()


def test_failed_download_says_how_to_fetch_by_hand(tmp_path, monkeypatch, serve):
    _serve_mnist(tmp_path, monkeypatch, serve, lambda base, name: base + "moved/" + name)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", download=True)
    first, *manual = str(info.value).splitlines()
    assert first.startswith("could not download train-images-idx3-ubyte.gz: http://")
    assert "404" in first
    assert manual[:2] == [f"data set 'mnist' was not found in {tmp_path / 'cache' / 'mnist'}.",
                          "Download these files:"]
    assert "--download" not in str(info.value)  # it was just tried


def test_random_crop_flip_is_a_shifted_window():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).reshape(2, 3, 6, 6)
    out = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    again = random_crop_flip(x, 2, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r:r + 6, c:c + 6] for r in range(5) for c in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(-1)) for w in windows)
    flips = random_crop_flip(x.repeat(32, 1, 1, 1), 0, torch.Generator().manual_seed(1))
    flipped = [torch.equal(f, x[i % 2].flip(-1)) for i, f in enumerate(flips)]
    assert all(torch.equal(f, x[i % 2]) or flipped[i] for i, f in enumerate(flips))
    assert 0 < sum(flipped) < 64


def test_prepare_batch_normalizes():
    data = load_dataset("digits")
    x = prepare_batch(data.train.images, data)
    assert x.dtype == torch.float32
    assert x.mean().item() == pytest.approx(0, abs=1e-5)
    assert x.std().item() == pytest.approx(1, abs=1e-3)


def test_fashion_mnist_is_read_from_its_system_folder_when_the_cache_lacks_it(
        tmp_path, monkeypatch):
    """Debian's dataset-fashion-mnist installs the IDX files in /usr/share/datasets: used after
    --data-dir and the cache folder, never before them."""
    cache, system = tmp_path / "cache", tmp_path / "system"
    monkeypatch.setenv("SDFA_DATA", str(cache))
    spec = sdfa_data.DATASETS["fashion-mnist"]
    monkeypatch.setitem(sdfa_data.DATASETS, "fashion-mnist",
                        dataclasses.replace(spec, system_dirs=(str(system),)))
    assert not sdfa_data.is_present("fashion-mnist")
    assert sdfa_data.dataset_dir("fashion-mnist") == cache / "fashion-mnist"
    written = write_mnist(system, n_train=12, n_test=6)
    assert sdfa_data.dataset_dir("fashion-mnist") == system
    data = load_dataset("fashion-mnist")
    assert torch.equal(data.train.labels, torch.from_numpy(written["train"][1]).long())
    write_mnist(cache / "fashion-mnist", n_train=8, n_test=4)  # the cache comes first
    assert len(load_dataset("fashion-mnist").train) == 8
    assert len(load_dataset("fashion-mnist", data_dir=system).train) == 12
