"""Checkpoint files: written atomically, read only as plain data, checked before they are used.

* Writing goes through a temporary file, ``fsync`` and ``os.replace``: a reader (or a run killed
  mid-write) never sees half a file.
* Reading uses ``torch.load(weights_only=True)``: a checkpoint is tensors, numbers, strings and
  containers of them, so a hostile file cannot run code (a pickled ``os.system`` is refused).
* torch.save writes a zip archive with a CRC-32 for every record, which ``torch.load`` does not
  check: :func:`load_checkpoint` checks them first, so flipped bytes inside a tensor are refused
  instead of resuming a run with garbage weights.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A checkpoint file is missing, damaged or not plain data (the message says what to do)."""


def write_atomic(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then move it into place."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))


def save_atomic(obj, path: Path) -> None:
    """``torch.save(obj)`` to ``path`` atomically."""
    write_atomic(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str | Path, map_location="cpu", *, what: str = "checkpoint"):
    """The object saved in ``path``, after checking that it is an intact file of plain data.

    Raises:
        CheckpointError: one line naming the file and the fault.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} {path} is a directory, not a file")
    if not path.exists():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        if path.stat().st_size == 0:
            raise CheckpointError(f"{what} {path} is empty (0 bytes): it was never written")
        if not zipfile.is_zipfile(path):
            raise CheckpointError(
                f"{what} {path} is not a checkpoint written by torch.save (truncated or another "
                "format)"
            )
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
        if bad is not None:
            raise CheckpointError(f"{what} {path} is damaged: record {bad} fails its CRC check")
        return torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as error:
        reason = str(error).splitlines()[0] if str(error) else "unknown objects"
        raise CheckpointError(
            f"{what} {path} holds objects other than tensors, numbers and strings, refused "
            f"unread (it may be hostile): {reason}"
        ) from None
    except (OSError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CheckpointError(f"{what} {path} cannot be read: {reason}") from None
