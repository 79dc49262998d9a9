"""Where data set files come from: the cache folder, checked downloads, and safe extraction.

A download is kept only once its MD5 matches the published one; an archive is extracted only if
none of its members could write outside the destination.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
import urllib.request
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from distsgd.errors import UsageError

DATA_ENV = "DISTSGD_DATA"
DEFAULT_CACHE = Path("~/.cache/distsgd")
DOWNLOAD_TIMEOUT = 60.0  # seconds without progress on a socket before a download gives up


def cache_dir(data_dir: str | Path | None = None) -> Path:
    """The cache folder: `data_dir`, else `$DISTSGD_DATA`, else ~/.cache/distsgd."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or DEFAULT_CACHE
    return Path(chosen).expanduser()


def download(url: str, dest: str | Path, md5: str, timeout: float = DOWNLOAD_TIMEOUT) -> Path:
    """Fetch `url` into `dest` and keep it only if its MD5 is `md5`.

    The bytes go to a temporary file beside `dest`, renamed into place once verified, so an
    interrupted or corrupt download never leaves a file that looks complete.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _copy_url(url, out, timeout)
        if actual != md5.lower():
            raise UsageError(f"checksum mismatch for {url}: expected MD5 {md5}, got {actual}; "
                             "the file was discarded")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _copy_url(url: str, out: BinaryIO, timeout: float) -> str:
    """Stream `url` into the binary file `out`; return the MD5 hex digest of what was written."""
    digest = hashlib.md5(usedforsecurity=False)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
    except (OSError, ValueError) as err:  # URLError and socket timeouts are OSErrors
        raise UsageError(f"download of {url} failed: {err}") from err
    return digest.hexdigest()


def extract_tar(archive: str | Path, dest: str | Path) -> None:
    """Extract the regular files and folders of a .tar.gz into `dest`, refusing unsafe members.

    Every member is checked before anything is written: absolute paths, `..` components, links and
    device files are rejected, so an archive cannot write outside `dest`.
    """
    dest = Path(dest)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member, archive)
            for member in members:
                _extract_member(tar, member, dest)
    except (tarfile.TarError, OSError, EOFError) as err:
        raise UsageError(f"cannot extract {archive}: {err}") from err


def _check_member(member: tarfile.TarInfo, archive: str | Path) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        raise UsageError(f"unsafe archive {archive}: member {member.name!r} leaves the folder")
    if not (member.isfile() or member.isdir()):
        raise UsageError(f"unsafe archive {archive}: member {member.name!r} is not a regular "
                         "file or folder")


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, dest: Path) -> None:
    target = dest.joinpath(*PurePosixPath(member.name).parts)
    if member.isdir():
        target.mkdir(parents=True, exist_ok=True)
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tar.extractfile(member)
    assert source is not None  # regular files always have contents
    with source, open(target, "wb") as out:
        while chunk := source.read(1 << 20):
            out.write(chunk)
