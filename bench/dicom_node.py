"""Throughput and robustness of the DICOM node, beside the REST server on the same films.

    python bench/dicom_node.py RUN ../shared/data/cxr-dev --n 200

The films (PNG) are written as CR DICOM files first. Then, each against a freshly started
``covidxray dicom-node RUN --out DIR``: DCMTK's storescu sends all of them in one association,
and the clock stops when the last Structured Report is in DIR; eight storescu processes at
once send a share each; the hostile files (a multi-frame bomb, a deflate bomb, a header with
an invalid window, a truncated file) are sent, and an echo must still be answered. The node's
peak resident memory (VmHWM) is read from /proc after each part. The REST figure:
``covidxray serve RUN`` with each film POSTed alone, one after the other. Prints a Markdown
table; the ratio is REST time over DICOM time on the same films.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_dicom(png: Path, out: Path, index: int) -> Path:
    """A PNG film as a CR DICOM file (8-bit, explicit VR little endian)."""
    from PIL import Image
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid
    pixels = np.asarray(Image.open(png).convert("L"))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(out), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "CR", f"bench{index}", f"bench^{index}"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = pixels.tobytes()
    ds.save_as(out, enforce_file_format=True)
    return out


def hostile_files(folder: Path) -> list[Path]:
    """A multi-frame bomb, a deflate bomb, an invalid window and a truncated file."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_decode import write_dicom
    folder.mkdir(parents=True, exist_ok=True)
    files = [write_dicom(folder / "frames.dcm", np.zeros((1000, 1000), np.uint8), bits=8,
                         deflated=True, pixel_data=bytes(300 * 1000 * 1000), NumberOfFrames=300),
             write_dicom(folder / "deflate.dcm", np.zeros((64, 64), np.uint16), deflated=True,
                         pixel_data=bytes(200_000_000)),
             write_dicom(folder / "window.dcm", np.zeros((64, 64), np.uint16),
                         WindowCenter=500.0, WindowWidth=-10.0)]
    good = write_dicom(folder / "good.dcm", np.zeros((64, 64), np.uint16))
    (folder / "truncated.dcm").write_bytes(good.read_bytes()[:400])
    return files + [folder / "truncated.dcm"]


def peak_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def start_node(run: str, out: Path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "covidxray", "dicom-node", run, "--port",
                                str(port), "--out", str(out), "--quiet"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(240):
        if subprocess.run(["echoscu", "-aec", "COVIDXRAY", "127.0.0.1", str(port)],
                          capture_output=True).returncode == 0:
            return process, port
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the node did not start")


def wait_for(out: Path, n: int, timeout: float = 3600) -> None:
    deadline = time.monotonic() + timeout
    while len(list(out.rglob("SR-*.dcm"))) < n and time.monotonic() < deadline:
        time.sleep(0.05)


def storescu(port: int, files: list[Path], concurrency: int = 1) -> None:
    chunks = [files[i::concurrency] for i in range(concurrency)]
    jobs = [subprocess.Popen(["storescu", "-aec", "COVIDXRAY", "127.0.0.1", str(port),
                              *map(str, chunk)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL) for chunk in chunks if chunk]
    for job in jobs:
        job.wait()


def rest_seconds(run: str, pngs: list[Path]) -> float:
    import httpx
    port = free_port()
    record = Path(tempfile.mkdtemp()) / "r.sqlite"
    server = subprocess.Popen([sys.executable, "-m", "covidxray", "serve", run, "--port",
                               str(port), "--audit-db", f"sqlite:///{record}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(240):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        started = time.monotonic()
        for png in pngs:
            response = httpx.post(url + "/api/predict", timeout=120,
                                  files=[("files", (png.name, png.read_bytes()))])
            assert response.status_code == 200, response.text
        return time.monotonic() - started
    finally:
        server.terminate()
        server.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("data", help="a folder of PNG films (searched recursively)")
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    if not shutil.which("storescu"):
        raise SystemExit("DCMTK's storescu is needed (apt-get install dcmtk)")
    pngs = sorted(Path(args.data).rglob("*.png"))[::7][:args.n]
    scratch = Path(tempfile.mkdtemp(prefix="covidxray-bench-"))
    films = [as_dicom(p, scratch / f"{i:04d}.dcm", i) for i, p in enumerate(pngs)]
    rows = []
    out = scratch / "out1"
    node, port = start_node(args.run, out)
    idle = resident_mb(node.pid)
    started = time.monotonic()
    storescu(port, films)
    wait_for(out, len(films))
    dicom_s = time.monotonic() - started
    rows.append(("one association", len(films), dicom_s, peak_mb(node.pid)))
    out8 = scratch / "out8"
    node.terminate(), node.wait()
    node, port = start_node(args.run, out8)
    started = time.monotonic()
    storescu(port, films, concurrency=8)
    wait_for(out8, len(films))
    rows.append(("8 storescu at once", len(films), time.monotonic() - started,
                 peak_mb(node.pid)))
    before = peak_mb(node.pid)
    storescu(port, hostile_files(scratch / "hostile"))
    alive = subprocess.run(["echoscu", "-aec", "COVIDXRAY", "127.0.0.1", str(port)],
                           capture_output=True).returncode == 0
    hostile_peak = peak_mb(node.pid)
    node.terminate(), node.wait()
    rest_s = rest_seconds(args.run, pngs)
    print(f"node idle: {idle:.0f} MB resident")
    print("| path | films | seconds | films/s | node peak MB |")
    print("|---|---:|---:|---:|---:|")
    for name, n, seconds, peak in rows:
        print(f"| DICOM node, {name} | {n} | {seconds:.1f} | {n / seconds:.2f} | {peak:.0f} |")
    print(f"| REST, one film per request | {len(pngs)} | {rest_s:.1f} | "
          f"{len(pngs) / rest_s:.2f} | - |")
    print(f"\nDICOM (one association) against REST: x{rest_s / dicom_s:.2f} the films per "
          f"second")
    print(f"hostile files (multi-frame bomb, deflate bomb, invalid window, truncated): node "
          f"{'still answers echo' if alive else 'DOES NOT ANSWER'}; peak {before:.0f} MB "
          f"before, {hostile_peak:.0f} MB after (+{hostile_peak - before:.0f} MB)")
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
