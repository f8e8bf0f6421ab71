"""Kaggle data sets through ``kagglehub`` (``covidxray data download``), laid out as the other
commands read them, with a checksum record of what was fetched.

kagglehub keeps its own cache (``KAGGLEHUB_CACHE``, default ``~/.cache/kagglehub``) and reads
credentials from its usual places (``KAGGLE_USERNAME``/``KAGGLE_KEY``, ``~/.kaggle/kaggle.json``).
A versioned handle (``owner/name/versions/N``) already in that cache needs no network at all.
"""

from __future__ import annotations

import json
import os
import shutil
from datetime import datetime, timezone
from pathlib import Path

from covidxray.errors import UserError
from covidxray.config import KAGGLE_DATASET
from covidxray.data.dataset import SPLIT_NAMES
from covidxray.fileutil import file_sha256
from covidxray.progress import progress

RECORD_FILE = "download.json"


class DownloadError(UserError, RuntimeError):
    """The data set could not be fetched; the message says what to do."""


def _fetch(handle: str) -> Path:
    """kagglehub's folder of ``handle``, downloaded unless already in its cache."""
    try:
        import kagglehub
        from kagglehub import exceptions as kaggle_errors
    except ImportError as exc:
        raise DownloadError("downloading from Kaggle needs kagglehub: pip install "
                            "'covidxray[kaggle]'") from exc
    import requests
    try:
        return Path(kagglehub.dataset_download(handle))
    except requests.ConnectionError as exc:
        raise DownloadError(
            f"{handle}: cannot reach Kaggle ({type(exc).__name__}). On a machine without "
            f"internet: download the data set elsewhere and give its folder to 'covidxray "
            f"train' as it is, or fill kagglehub's cache (KAGGLEHUB_CACHE) and ask for that "
            f"version: {handle.split('/versions/')[0]}/versions/N") from exc
    except (kaggle_errors.CredentialError, kaggle_errors.UnauthenticatedError) as exc:
        raise DownloadError(
            f"{handle}: Kaggle needs your credentials: set KAGGLE_USERNAME and KAGGLE_KEY, or "
            f"put kaggle.json (Kaggle > Settings > API > Create New Token) in ~/.kaggle/ "
            f"({exc})") from exc
    except (kaggle_errors.NotFoundError, requests.HTTPError, ValueError) as exc:
        raise DownloadError(f"{handle}: Kaggle could not give this data set ({exc}); check the "
                            f"handle (owner/name, or owner/name/versions/N) and your access "
                            f"to it") from exc


def data_root(folder: Path) -> Path:
    """The folder the other commands read: below wrapper folders that hold only one folder
    (archives often add one), stopping at split or class folders or files."""
    while True:
        entries = [p for p in folder.iterdir()
                   if not p.name.startswith(".") and p.name != RECORD_FILE]
        if (len(entries) == 1 and entries[0].is_dir()
                and entries[0].name.lower() not in SPLIT_NAMES):
            inner = [p for p in entries[0].iterdir() if not p.name.startswith(".")]
            if inner and all(p.is_dir() for p in inner):
                folder = entries[0]
                continue
        return folder


def _place(source: Path, target: Path) -> None:
    """A hard link when both are on one file system (no second copy of the images), else a
    copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def download(handle: str = KAGGLE_DATASET, out: str | Path = "data") -> dict:
    """Fetch ``handle`` into the folder ``out/<name>`` with ``download.json`` (handle, version,
    date, every file's size and sha256); returns that record with ``root``, the folder to
    train on. Written under a temporary name and renamed, so a cut download leaves no folder
    that looks complete; an existing folder is refused."""
    if "/" not in handle:
        raise DownloadError(f"{handle!r}: a Kaggle data set is named owner/name "
                            f"(e.g. {KAGGLE_DATASET})")
    target = Path(out) / handle.split("/")[1]
    if target.exists():
        raise DownloadError(f"{target} already exists: remove it or choose another --out")
    fetched = _fetch(handle)
    files = sorted(p for p in fetched.rglob("*") if p.is_file())
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    record = {"handle": handle, "version": fetched.name if fetched.parent.name == "versions"
              else None, "fetched": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "files": {}}
    for path in progress(files, desc="checking files", unit="file"):
        relative = path.relative_to(fetched)
        (partial / relative).parent.mkdir(parents=True, exist_ok=True)
        _place(path, partial / relative)
        record["files"][relative.as_posix()] = {"bytes": path.stat().st_size,
                                                "sha256": file_sha256(path)}
    (partial / RECORD_FILE).write_text(json.dumps(record, indent=1) + "\n")
    partial.rename(target)
    return {**record, "folder": str(target), "root": str(data_root(target))}
