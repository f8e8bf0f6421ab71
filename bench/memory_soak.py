"""Memory over time (issue 34): the server over rounds of concurrent requests, and the DICOM
node over 200 films with its PACS down, then up.

    python bench/memory_soak.py server RUN --images DIR [--rounds 20 --clients 30]
    python bench/memory_soak.py node RUN --film CHEST.dcm [--films 200]

server: ``covidxray serve RUN`` (one worker); two warm-up rounds, then ``--rounds`` rounds of
``--clients`` requests sent at once (one X-ray each); the server's resident memory one second
after each round. Prints each round's figure, the first (after the warm-up), the peak and the
last, the last as a ratio of the first, and the mean of the last five rounds as a ratio of the
mean of the first five (flat: within 5%; a single round's figure moves by a few MB).

node: ``covidxray dicom-node RUN --send-to ORTHANC@...`` with nothing listening at the PACS's
port; ``--films`` C-STOREs (the same film, a new SOP Instance UID each), acknowledged while
their results wait in the outbox; then Orthanc starts, and the node delivers them. Resident
memory sampled every 100 ms: at rest, peak and last while the PACS is down, peak and last once
everything is delivered; and the count Orthanc holds at the end (two results per film).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from processes import dicom_sender, free_port, rss_mb, wait_until


def server(args) -> None:
    images = sorted(Path(args.images).glob("*.png"))[:args.clients]
    payloads = [p.read_bytes() for p in images]
    work = Path(tempfile.mkdtemp())
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "covidxray", "serve", args.run, "--port",
                                str(port), "--queue", str(args.clients),
                                "--audit-db", f"sqlite:///{work / 'record.sqlite'}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/health", timeout=1).status_code == 200, 600,
                   "the server's start")
        at_rest = rss_mb(process.pid)
        figures, statuses = [], {}

        def one(data: bytes) -> None:
            answer = httpx.post(url + "/api/predict", files={"files": ("x.png", data)},
                                timeout=600)
            statuses[answer.status_code] = statuses.get(answer.status_code, 0) + 1

        for round_ in range(args.rounds + 2):
            threads = [threading.Thread(target=one, args=(payloads[i % len(payloads)],))
                       for i in range(args.clients)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            if round_ >= 2:  # after the warm-up, once the server has been idle a second
                time.sleep(1)
                figures.append(rss_mb(process.pid))
                print(f"round {round_ - 1:>2}: {figures[-1]:7.1f} MB", flush=True)
        print(f"server, {args.rounds} rounds of {args.clients} concurrent requests (statuses "
              f"{statuses}): at rest {at_rest:.0f} MB; after the warm-up {figures[0]:.0f} MB, "
              f"peak {max(figures):.0f} MB, last {figures[-1]:.0f} MB: last / first = "
              f"{figures[-1] / figures[0]:.3f}; last five / first five (means) = "
              f"{statistics.mean(figures[-5:]) / statistics.mean(figures[:5]):.3f}")
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def node(args) -> None:
    import pydicom
    from pydicom.uid import generate_uid
    film = pydicom.dcmread(args.film)
    work = Path(tempfile.mkdtemp())
    node_port, pacs_port, http_port = free_port(), free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "covidxray", "dicom-node", args.run, "--port", str(node_port),
         "--send-to", f"ORTHANC@127.0.0.1:{pacs_port}", "--outbox", str(work / "outbox"),
         "--timeout", "5", "--audit-db", f"sqlite:///{work / 'record.sqlite'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples, stop = [], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append((time.monotonic(), rss_mb(process.pid)))
            time.sleep(0.1)

    orthanc = None
    try:
        ae, echoes = dicom_sender(film)
        wait_until(lambda: echoes(node_port), 600, "the node's start")
        at_rest = rss_mb(process.pid)
        threading.Thread(target=sample, daemon=True).start()
        started = time.monotonic()
        assoc = ae.associate("127.0.0.1", node_port, ae_title="COVIDXRAY")
        acknowledged = 0
        for _ in range(args.films):
            film.SOPInstanceUID = film.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            acknowledged += assoc.send_c_store(film).Status == 0
        assoc.release()
        down = time.monotonic()
        waiting = len(list((work / "outbox").glob("*.dcm")))
        (work / "orthanc.json").write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(work / "storage"),
            "IndexDirectory": str(work / "index"), "HttpPort": http_port,
            "DicomPort": pacs_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False}))
        orthanc = subprocess.Popen(["Orthanc", str(work / "orthanc.json")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: not list((work / "outbox").glob("*.dcm")), 1800, "the delivery")
        delivered = time.monotonic()
        stop.set()
        held = len(httpx.get(f"http://127.0.0.1:{http_port}/instances").json())
        while_down = [m for t, m in samples if t <= down]
        after = [m for t, m in samples if t > down]
        print(f"node, {args.films} films with the PACS down ({acknowledged} acknowledged, "
              f"{waiting} results waiting in {down - started:.0f} s), then up (delivered in "
              f"{delivered - down:.0f} s; Orthanc holds {held}): at rest {at_rest:.0f} MB; PACS "
              f"down: peak {max(while_down):.0f} MB, last {while_down[-1]:.0f} MB; PACS up: "
              f"peak {max(after):.0f} MB, last {after[-1]:.0f} MB")
    finally:
        stop.set()
        for running in (process, orthanc):
            if running is not None:
                running.terminate()
                running.wait(30)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["server", "node"])
    parser.add_argument("run")
    parser.add_argument("--images", help="server: a folder of PNG X-rays")
    parser.add_argument("--film", help="node: a chest DICOM")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--films", type=int, default=200)
    args = parser.parse_args()
    (server if args.what == "server" else node)(args)


if __name__ == "__main__":
    main()
