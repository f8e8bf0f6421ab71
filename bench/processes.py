"""What the benchmarks that start covidxray's servers share: a free port, the resident memory
of a process and its children, and waiting for something to be ready."""

from __future__ import annotations

import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (the workers), in MB."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("VmRSS")) / 1024
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
            pending += [int(c) for c in children]
        except (OSError, StopIteration):
            continue
    return total


def wait_until(check, seconds: float, what: str) -> None:
    """Until ``check()`` is true (an error it raises counts as not yet), at most ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # a server not listening yet, a connection refused
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not happen within {seconds:.0f} s")


def dicom_sender(film):
    """A calling AE for a node under test that can send ``film`` (a pydicom data set), and a
    check that the node at a port answers a C-ECHO (for ``wait_until``)."""
    from pynetdicom import AE
    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(film.SOPClassUID, film.file_meta.TransferSyntaxUID)

    def echoes(port: int) -> bool:
        assoc = ae.associate("127.0.0.1", port, ae_title="COVIDXRAY")
        ok = assoc.is_established and assoc.send_c_echo().Status == 0
        if assoc.is_established:
            assoc.release()
        return ok
    return ae, echoes
