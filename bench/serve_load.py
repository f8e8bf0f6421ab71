"""The server under load and under attack, measured from outside on loopback.

    python bench/serve_load.py RUN --images ../shared/data/cxr-dev/COVID --requests 120

1. Throughput: ``covidxray serve RUN --workers N`` for N = 1 and 2, driven by ``--clients``
   threads each sending one X-ray per request until ``--requests`` are answered; requests/s
   and p50/p95 latency, the 2-worker figures as a ratio of the 1-worker ones (same run, same
   images, same machine).
2. Memory under the bomb cases of issue 16 (one worker): the server processes' resident memory
   sampled every 20 ms while each request is answered, peak minus the idle figure, with the
   status the server gave.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from processes import free_port, rss_mb


def start(run: str, workers: int, record: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "covidxray", "serve", run, "--port",
                                str(port), "--workers", str(workers), "--audit-db",
                                f"sqlite:///{record}"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not start")


def load(url: str, images: list[bytes], requests: int, clients: int) -> dict:
    latencies, statuses, lock = [], [], threading.Lock()
    counter = iter(range(requests))

    def client():
        with httpx.Client(timeout=120) as session:
            for index in counter:
                data = images[index % len(images)]
                started = time.perf_counter()
                response = session.post(url + "/api/predict", files=[("files", ("x.png",
                                                                                 data))])
                with lock:
                    latencies.append(time.perf_counter() - started)
                    statuses.append(response.status_code)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ok = statuses.count(200)
    return {"requests_per_s": ok / wall, "p50_ms": 1000 * statistics.median(latencies),
            "p95_ms": 1000 * sorted(latencies)[int(0.95 * len(latencies)) - 1],
            "answered_200": ok, "answered_503": statuses.count(503)}


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def deflate_bomb(folder: Path) -> bytes:
    """A DICOM of a few hundred KB whose data set inflates to 200 MB behind a 64x64 header."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_decode import write_dicom
    return write_dicom(folder / "bomb.dcm", np.zeros((64, 64), np.uint16), deflated=True,
                       pixel_data=bytes(200_000_000)).read_bytes()


def multi_frame_bomb(folder: Path) -> bytes:
    """A deflated DICOM of a few hundred KB that declares 300 frames of 1000x1000."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_decode import write_dicom
    return write_dicom(folder / "frames.dcm", np.zeros((1000, 1000), np.uint8), bits=8,
                       deflated=True, pixel_data=bytes(300 * 1000 * 1000),
                       NumberOfFrames=300).read_bytes()


def bomb_cases(folder: Path, xray: bytes) -> dict[str, list[tuple[str, bytes]]]:
    blank = png(np.zeros((7745, 7745), np.uint8))  # 60 M pixels, 175 KB
    frames = multi_frame_bomb(folder)
    return {
        "deflated DICOM, 64x64 declared, 200 MB inflated": [("bomb.dcm", deflate_bomb(folder))],
        "deflated DICOM, 300 frames of 1000x1000 declared": [("frames.dcm", frames)],
        "16 such multi-frame DICOMs in one request": [(f"f{i}.dcm", frames) for i in range(16)],
        "three 7745x7745 zero PNGs in one request": [(f"{i}.png", blank) for i in range(3)],
        "100 tiny images in one request": [(f"{i}.png", png(np.full((32, 32), i, np.uint8)))
                                           for i in range(100)],
        "a 10000x10000 PNG": [("huge.png", png(np.zeros((10000, 10000), np.uint8)))],
        "one real X-ray (for comparison)": [("x.png", xray)],
    }


def memory_under(url: str, pid: int, files: list[tuple[str, bytes]]) -> dict:
    idle, peak, done = rss_mb(pid), [0.0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mb(pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    response = httpx.post(url + "/api/predict", files=[("files", f) for f in files],
                          timeout=300)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"status": response.status_code, "seconds": round(seconds, 2),
            "peak_over_idle_mb": round(max(peak[0], idle) - idle, 1)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--images", required=True, help="a folder of X-ray PNGs")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients (bounded)")
    args = parser.parse_args(argv)
    images = [path.read_bytes() for path in sorted(Path(args.images).glob("*.png"))[:40]]
    folder = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    rows = {}
    for workers in (1, 2):
        process, url = start(args.run, workers, folder / f"record-{workers}.sqlite")
        try:
            load(url, images[:4], 8, 2)  # warm-up
            rows[workers] = load(url, images, args.requests, args.clients)
            print(f"workers={workers}: {rows[workers]}", flush=True)
            if workers == 1:
                for case, files in bomb_cases(folder, images[0]).items():
                    print(f"  {case}: {memory_under(url, process.pid, files)}", flush=True)
        finally:
            process.terminate()
            process.wait(timeout=60)
    ratio = rows[2]["requests_per_s"] / rows[1]["requests_per_s"]
    print(f"2 workers against 1: requests/s x{ratio:.2f}, "
          f"p95 latency x{rows[2]['p95_ms'] / rows[1]['p95_ms']:.2f}")


if __name__ == "__main__":
    main()
