"""Run directories: chosen without collisions and locked for the whole life of a run.

A run holds an exclusive ``flock`` on ``RUN_DIR/.lock`` from before it looks at the directory
until it ends. The kernel drops the lock when the process dies, however it dies, so a lock left
by a killed run never blocks its ``--resume``; a second run, or a resume of a run that is still
going, is refused with one line naming the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
from datetime import datetime
from pathlib import Path

LOCK = ".lock"


@contextlib.contextmanager
def claim(path: Path, *, fresh: bool, default_name: bool = False):
    """Create (``fresh``) or reopen the run directory ``path``, hold its lock, yield its path.

    ``default_name``: ``path`` is a generated name; if another run took it meanwhile, the next
    free ``path-2``, ``path-3``, ... is used instead of failing.
    """
    path = _create(path, default_name) if fresh else path
    fd = _lock(path)
    try:
        if fresh:
            check_fresh(path)
        for stale in path.glob(".*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
        yield path
    finally:
        os.close(fd)


def check_fresh(path: Path) -> None:
    """A fresh run needs an absent directory, or one with nothing but leftovers of a killed
    start (temporary files, the lock)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a directory: choose another --out")
    if path.is_dir() and any(not _leftover(p) for p in path.iterdir()):
        raise ValueError(
            f"{path} already exists and is not empty: pass --resume to continue that run, "
            "or choose another --out"
        )


def slug(text: str) -> str:
    """``text`` as a folder name: lower case, each run of other characters one hyphen."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def default_path(parts: list[str], settings: str) -> Path:
    """``runs/<parts>-<time to the microsecond>-<digest of the settings>``: two runs started at
    once differ in time or settings, and :func:`claim` settles any tie."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    digest = hashlib.sha256(settings.encode()).hexdigest()[:6]
    return Path("runs") / "-".join([*parts, stamp, digest])


def _leftover(path: Path) -> bool:
    return path.name == LOCK or (path.name.startswith(".") and path.name.endswith(".tmp"))


def _create(path: Path, default_name: bool) -> Path:
    if path.exists() and not path.is_dir():
        raise ValueError(f"--out {path} is a file, not a directory: choose another --out")
    if not default_name:
        path.mkdir(parents=True, exist_ok=True)
        return path
    candidate, n = path, 1
    while True:
        try:
            candidate.mkdir(parents=True)
            return candidate
        except FileExistsError:
            n += 1
            candidate = path.with_name(f"{path.name}-{n}")


def _lock(path: Path) -> int:
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise ValueError(
            f"{path} is in use by another sdfa run (process {holder}, lock {path / LOCK}): "
            "wait for it to finish, or choose another --out"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd
