"""The DICOM node's outbox: results it has acknowledged to the modality and not yet delivered
to the PACS.

Each result object is written to the outbox folder (a temporary name, flushed to the disk,
then renamed) before the node answers the C-STORE, so that nothing acknowledged is lost: not
when the PACS is down, not when the node is killed. A sender thread delivers what waits, oldest
first, and removes each file once the PACS has accepted it; while the PACS refuses or cannot be
reached it tries again with a growing pause (``RETRY_FIRST_S`` doubling up to ``RETRY_MAX_S``).
A node that starts finds what its predecessor left and sends it. A result that has waited
longer than the expiry is moved to ``expired/`` with an error in the log (never deleted), for a
person to look at. ``status.json`` in the folder says what waits, for ``covidxray dicom-node
--status`` and monitoring.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import threading
import time
from pathlib import Path

from covidxray.fileutil import atomic_path, write_json_atomic

log = logging.getLogger(__name__)

RETRY_FIRST_S = 2.0
RETRY_MAX_S = 300.0
EXPIRED = "expired"
STATUS = "status.json"
SUFFIX = ".dcm"


class Outbox:
    """Results waiting for the PACS, as files in ``folder``; ``send(paths)`` tries to deliver
    them and returns those the PACS accepted."""

    def __init__(self, folder: str | Path, send, expiry_s: float):
        self.folder = Path(folder)
        self.send = send
        self.expiry_s = expiry_s
        self.folder.mkdir(parents=True, exist_ok=True)
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._failures = 0
        self._last_error: str | None = None
        self._next_attempt: float | None = None

    def put(self, datasets) -> list[Path]:
        """Keep ``datasets`` (pydicom data sets) until delivered: each written and flushed to
        the disk before this returns; then the sender is woken."""
        paths = []
        for dataset in datasets:
            name = f"{time.time_ns():020d}-{dataset.SOPInstanceUID}{SUFFIX}"
            with atomic_path(self.folder / name, suffix=SUFFIX) as tmp:
                dataset.save_as(tmp, enforce_file_format=True)
                with open(tmp, "rb+") as handle:
                    os.fsync(handle.fileno())
            paths.append(self.folder / name)
        self._write_status()
        self._wake.set()
        return paths

    def waiting(self) -> list[Path]:
        """What waits, oldest first (the names start with the time they were written)."""
        return sorted(p for p in self.folder.glob(f"*{SUFFIX}") if not p.name.startswith("."))

    def start(self) -> "Outbox":
        self._thread = threading.Thread(target=self._run, name="covidxray-outbox", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._expire()
            waiting = self.waiting()
            if not waiting:
                self._next_attempt = None
                self._write_status()
                self._wake.wait(60)
                self._wake.clear()
                continue
            try:
                delivered = self.send(waiting)
                error = None if len(delivered) == len(waiting) else \
                    f"{len(waiting) - len(delivered)} of {len(waiting)} not accepted"
            except Exception as failure:  # the PACS's trouble: try again later
                delivered, error = [], f"{type(failure).__name__}: {failure}"
            for path in delivered:
                path.unlink(missing_ok=True)
            if error is None:
                self._failures, self._last_error = 0, None
                continue
            self._failures += 1
            self._last_error = error
            pause = min(RETRY_FIRST_S * 2 ** (self._failures - 1), RETRY_MAX_S)
            self._next_attempt = time.time() + pause
            log.warning("%d results wait in %s for the PACS (%s); next try in %.0f s",
                        len(self.waiting()), self.folder, error, pause)
            self._write_status()
            self._wake.wait(pause)
            self._wake.clear()

    def _expire(self) -> None:
        now = time.time()
        for path in self.waiting():
            written = int(path.name.split("-", 1)[0]) / 1e9
            if now - written > self.expiry_s:
                target = self.folder / EXPIRED / path.name
                target.parent.mkdir(exist_ok=True)
                os.replace(path, target)
                log.error("%s waited %.1f hours for the PACS and expired: moved to %s, to be "
                          "sent by hand", path.name, (now - written) / 3600, target.parent)

    def status(self) -> dict:
        return status_of(self.folder) | {
            "failed_attempts": self._failures, "last_error": self._last_error,
            "next_attempt": None if self._next_attempt is None else _iso(self._next_attempt)}

    def _write_status(self) -> None:
        try:
            write_json_atomic(self.folder / STATUS, self.status())
        except OSError as error:  # the folder's trouble shows on the next put
            log.debug("outbox status not written: %s", error)


def status_of(folder: str | Path) -> dict:
    """What waits in an outbox folder, read from its files (another process may own it)."""
    folder = Path(folder)
    waiting = sorted(p for p in folder.glob(f"*{SUFFIX}") if not p.name.startswith("."))
    expired = sorted((folder / EXPIRED).glob(f"*{SUFFIX}"))
    oldest = int(waiting[0].name.split("-", 1)[0]) / 1e9 if waiting else None
    saved = {}
    if (folder / STATUS).is_file():
        try:
            saved = json.loads((folder / STATUS).read_text())
        except (OSError, ValueError):
            saved = {}
    return {"folder": str(folder), "waiting": len(waiting),
            "oldest_waiting_since": None if oldest is None else _iso(oldest),
            "expired": len(expired),
            "last_error": saved.get("last_error"), "next_attempt": saved.get("next_attempt"),
            "failed_attempts": saved.get("failed_attempts", 0)}


def _iso(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc).isoformat(
        timespec="seconds")
