"""Atomic writes (a crash never leaves a file that looks complete), a clear error when the disk
is full, and one job per run folder."""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

from covidxray.errors import UserError

# left free on a disk beyond what a write needs: the system and other writers need some too
SPARE_BYTES = 16 << 20
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(UserError, OSError):
    """No space left for a write: names the folder, the space needed and what is free."""

    def __init__(self, path: Path, needed: int | None, free: int):
        self.path, self.needed, self.free = Path(path), needed, free
        need = f"about {needed / 2**20:.0f} MB" if needed else "more space"
        super().__init__(errno.ENOSPC, f"no space left in {self.path.parent} to write "
                                       f"{self.path.name}: it needs {need}, "
                                       f"{free / 2**20:.0f} MB are free; free some space "
                                       f"(nothing complete-looking was left) and run the "
                                       f"same command again")


def _no_space(error: BaseException) -> bool:
    """Whether an error (an OSError, or a library's wrapper of one, such as h5py's) means the
    disk is full."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in NO_SPACE:
            return True
        if "no space left on device" in str(error).lower():
            return True
        error = error.__cause__ or error.__context__
    return False


def check_free_space(path: Path, needed: int) -> None:
    """Refuse (``DiskFullError``) a write of ``needed`` bytes to ``path`` that the disk cannot
    take with ``SPARE_BYTES`` to spare: some writers (h5py) crash the process when the disk
    fills under them."""
    free = shutil.disk_usage(path.parent).free
    if needed + SPARE_BYTES > free:
        raise DiskFullError(path, needed, free)


@contextmanager
def atomic_path(path: str | Path, suffix: str | None = None, expected_bytes: int | None = None):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    ``suffix`` keeps the extension some writers insist on (Keras wants ``.keras``).
    ``expected_bytes``: about what will be written, checked against the free space first. A
    write that runs out of space raises ``DiskFullError`` and leaves nothing behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if expected_bytes is not None:
        check_free_space(path, expected_bytes)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix or ".partial",
                                   dir=path.parent)
    except OSError as error:
        if _no_space(error):
            raise DiskFullError(path, expected_bytes, shutil.disk_usage(path.parent).free) \
                from error
        raise
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except Exception as error:
        if _no_space(error) and not isinstance(error, DiskFullError):
            raise DiskFullError(path, expected_bytes, shutil.disk_usage(path.parent).free) \
                from error
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


class FolderLockedError(UserError, RuntimeError):
    """Another job holds the folder."""


@contextmanager
def folder_lock(folder: str | Path, what: str = "job"):
    """Hold ``folder/.lock`` (created atomically, with this process's id, host and start time)
    while the block runs; another job that tries is refused naming the holder. A lock left by
    a process of this host that no longer runs is stale: it is named and taken over."""
    lock = Path(folder) / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    for attempt in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            holder = _lock_holder(lock)
            if attempt == 0 and holder is not None and _stale(holder):
                import logging
                logging.getLogger(__name__).warning(
                    "%s: taking over the stale lock of %s (pid %s on %s since %s), a process "
                    "that no longer runs", folder, holder.get("what", "a job"),
                    holder.get("pid"), holder.get("host"), holder.get("since"))
                lock.unlink(missing_ok=True)
                continue
            who = (f"{holder.get('what', 'a job')} (pid {holder.get('pid')} on "
                   f"{holder.get('host')} since {holder.get('since')})" if holder
                   else "another job")
            raise FolderLockedError(f"{folder} is in use by {who}: wait for it to end, or use "
                                    f"another folder; if it is known to be dead, remove "
                                    f"{lock}") from None
    with os.fdopen(fd, "w") as handle:
        json.dump(mine, handle)
    try:
        yield
    finally:
        if _lock_holder(lock) == mine:
            lock.unlink(missing_ok=True)


def _lock_holder(lock: Path) -> dict | None:
    try:
        return json.loads(lock.read_text())
    except (OSError, ValueError):
        return None


def _stale(holder: dict) -> bool:
    """A lock of this host whose process is gone (another host's cannot be checked)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, KeyError, ValueError, TypeError):
        return False
    return False


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_text_atomic(path: str | Path, text: str, errors: str = "strict") -> None:
    """UTF-8 text; ``errors="backslashreplace"`` writes any str (file names that are not
    valid UTF-8 arrive as surrogates) as valid UTF-8."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors=errors)


def write_json_atomic(path: str | Path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def schema_version(values: dict, newest: int, source: str, kind: str, error: type) -> int:
    """The ``schema_version`` of a versioned JSON record (1 where absent), checked: a version
    this covidxray cannot read raises ``error`` naming ``source`` and the ``kind`` of file."""
    version = values.get("schema_version", 1)
    if not isinstance(version, int) or version < 1:
        raise error(f"{source}: schema_version {version!r} is not a version")
    if version > newest:
        raise error(f"{source}: written by a newer covidxray ({kind} format {version}; this "
                    f"version reads up to {newest}): upgrade covidxray")
    return version


def _json_default(value):
    # numpy scalars and arrays, Paths
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


CACHE_ENV = "COVIDXRAY_CACHE"


def cache_dir() -> Path:
    """Where covidxray keeps what it derives once and reuses (ready models built from their
    shipped weights, models exported for onnxruntime): ``$COVIDXRAY_CACHE``, else
    ``$XDG_CACHE_HOME/covidxray``, else ``~/.cache/covidxray``. A folder that cannot be
    written (a read-only home) is replaced by one under the system's temporary folder, with
    the reason logged once, so that nothing fails for want of a cache."""
    chosen = os.environ.get(CACHE_ENV) or (
        Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "covidxray")
    chosen = Path(chosen).expanduser()
    if _writable(chosen):
        return chosen
    fallback = Path(tempfile.gettempdir()) / f"covidxray-cache-{os.getuid()}"
    if fallback not in _CACHE_WARNED:
        _CACHE_WARNED.add(fallback)
        logging.getLogger("covidxray").warning(
            "cache folder %s cannot be written: using %s (set %s to choose another)", chosen,
            fallback, CACHE_ENV)
    fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
    return fallback


_CACHE_WARNED: set[Path] = set()


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK | os.X_OK)
