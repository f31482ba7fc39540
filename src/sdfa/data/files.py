"""Finding, downloading and checking data files.

Downloads go to a cache directory (``$SDFA_DATA``, else ``~/.cache/sdfa``), one folder per
data set. pooch fetches each file into a temporary file and checks it against the official MD5
before it takes the official name; so a file under its official name in the cache is always
complete. Mirrors are tried in order.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .core import DataError

TIMEOUT = 60  # seconds without an answer before a mirror counts as down


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its name, the URLs it can be fetched from, and its MD5."""

    name: str
    urls: tuple[str, ...]
    md5: str


def data_root() -> Path:
    """Where data sets are looked for and downloaded to when no directory is given."""
    return Path(os.environ.get("SDFA_DATA") or Path.home() / ".cache" / "sdfa")


def download(remote: RemoteFile, directory: Path) -> Path:
    """Fetch ``remote`` into ``directory`` (trying each URL in turn) and verify its MD5; a copy
    already there with the right MD5 is kept.

    Raises:
        DataError: no URL answered, or every copy had the wrong checksum.
    """
    import pooch  # imported here: it brings in requests, which a run without downloads skips

    fetch = pooch.HTTPDownloader(progressbar=sys.stderr.isatty(), timeout=TIMEOUT)
    problems = []
    for url in remote.urls:
        try:
            path = pooch.retrieve(url, known_hash=f"md5:{remote.md5}", fname=remote.name,
                                  path=directory, downloader=fetch)
            return Path(path)
        except ValueError as error:  # pooch: the MD5 differs (the copy is deleted)
            got = re.search(r"but got (\w+)", str(error))
            problems.append(f"{url}: MD5 {got[1]}, expected {remote.md5}" if got
                            else f"{url}: {error}")
        except OSError as error:  # requests' connection, timeout and HTTP errors are OSErrors
            problems.append(f"{url}: {error}")
    raise DataError(f"could not download {remote.name}: " + "; ".join(problems))


def read_bytes(path: Path) -> bytes:
    """The content of the data file ``path``; an unreadable one is a DataError naming it."""
    try:
        return Path(path).read_bytes()
    except OSError as error:  # e.g. permission denied, an I/O error of the disk
        raise DataError(f"{path}: cannot read it ({error.strerror or error})") from None


def obstacle(path: Path, want: str = "file") -> str | None:
    """What stands at ``path`` in place of the ``want`` ("file" or "folder") that a data set
    needs there, e.g. "a folder"; None when it is one, or when nothing is there."""
    if path.is_symlink() and not path.exists():
        return f"a broken symbolic link (to {os.readlink(path)})"
    if not path.exists() or (path.is_dir() if want == "folder" else path.is_file()):
        return None
    if path.is_dir():
        return "a folder"
    return "a file" if path.is_file() else "not a regular file"


def missing_files_message(
    dataset: str,
    directory: Path,
    files: list[RemoteFile],
    note: str = "",
    offer_download=True,
    partial=False,
) -> str:
    """The error text for absent files: what to download, from where, and where to put it.

    ``files`` are the absent ones; when the data set has others that are present, pass
    ``partial=True`` so the message names the missing files instead of the whole data set.
    """
    if partial:
        names = ", ".join(remote.name for remote in files)
        lines = [f"data set {dataset!r} in {directory} is incomplete: {names} not found."]
    else:
        lines = [f"data set {dataset!r} was not found in {directory}."]
    lines.append("Download these files:")
    for remote in files:
        lines.append(f"  {remote.urls[0]}  (MD5 {remote.md5})")
    lines.append(f"and put them in {directory} (or pass --data-dir DIR pointing at them)")
    if offer_download:
        lines[-1] += ","
        lines.append("or run the same command with --download to fetch and check them there.")
    if note:
        lines.append(note)
    return "\n".join(lines)
