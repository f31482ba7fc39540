"""Finding, downloading and checking data files.

Downloads go to a cache directory (``$SDFA_DATA``, else ``~/.cache/sdfa``), one folder per
data set, through a temporary file that is checked against the official MD5 before it takes the
official name; so a file under its official name in the cache is always complete.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .core import DataError


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its name, the URLs it can be fetched from, and its MD5."""

    name: str
    urls: tuple[str, ...]
    md5: str


def data_root() -> Path:
    """Where data sets are looked for and downloaded to when no directory is given."""
    return Path(os.environ.get("SDFA_DATA") or Path.home() / ".cache" / "sdfa")


def md5sum(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(remote: RemoteFile, directory: Path) -> Path:
    """Fetch ``remote`` into ``directory`` (trying each URL) and verify its MD5.

    Raises:
        DataError: no URL answered, or every copy had the wrong checksum.
    """
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / remote.name
    if target.exists() and md5sum(target) == remote.md5:
        return target
    problems = []
    for url in remote.urls:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{remote.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
                shutil.copyfileobj(response, out, 1 << 20)
            got = md5sum(Path(tmp))
            if got != remote.md5:
                problems.append(f"{url}: MD5 {got}, expected {remote.md5}")
                continue
            os.replace(tmp, target)
            return target
        except OSError as error:  # URLError, timeouts and HTTP errors are OSErrors
            problems.append(f"{url}: {error}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise DataError(f"could not download {remote.name}: " + "; ".join(problems))


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
