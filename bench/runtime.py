"""Keras trains, onnxruntime answers (issue 33): each figure beside its baseline, measured in
one run on the same films.

    python bench/runtime.py RUN --images DIR [--requests 240 --clients 8 --films 200]
        [--xrv-python /path/to/venv/bin/python]

1. The server, one worker, every answer with its heat map, overlay and previews: today's
   ``--runtime keras --batch-films 1`` (one request per forward pass, on Keras) against the
   default (onnxruntime, requests that arrive together sharing a pass): requests/s, p50 and
   p95 latency, and the worker's resident memory at rest.
2. Archive scoring (``covidxray predict RUN DIR --out x.csv``) and the DICOM node (``--films``
   C-STOREs of the same chest film over one association): films/s, Keras against onnxruntime.
3. From file to P(COVID) and heat map, film after film in one process (after a warm-up):
   covidxray's ``Predictor`` against torchxrayvision's DenseNet-121 pipeline
   (``xrv.models.DenseNet(weights=None)`` at 224 px: its speed does not depend on its weights;
   read with skimage as its README does, ``xrv.datasets.normalize``, centre crop and resize,
   one forward and backward pass for Grad-CAM), run by ``--xrv-python``, the interpreter of a
   separate environment where torchxrayvision is installed (it is no dependency of covidxray).

The whole-command time of ``covidxray predict RUN film.png`` (against ``--runtime keras``) is
measured from outside, paired, over several runs (docs/benchmarks.md gives the command).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

XRV_PIPELINE = r"""
import json, sys, time
import numpy as np, skimage.io, torch, torchvision, torchxrayvision as xrv
torch.set_num_threads(2)
paths = json.loads(sys.argv[1])
model = xrv.models.DenseNet(weights=None).eval()  # 18 outputs, 224 px, as the weighted ones
transform = torchvision.transforms.Compose([xrv.datasets.XRayCenterCrop(),
                                            xrv.datasets.XRayResizer(224)])
def one(path):
    image = skimage.io.imread(path)
    image = xrv.datasets.normalize(image, 255)
    if image.ndim == 3:
        image = image.mean(2)
    image = torch.from_numpy(transform(image[None])).float()[None].requires_grad_(False)
    features = model.features(image)
    features.retain_grad()
    out = model.classifier(torch.nn.functional.adaptive_avg_pool2d(
        torch.relu(features), 1).flatten(1))
    score = torch.sigmoid(out[0, 0])  # the first finding's probability, as P(COVID) would be
    score.backward()
    weights = features.grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((weights * features).sum(1))[0].detach().numpy()
    return float(score), cam / max(cam.max(), 1e-12)
for path in paths[:3]:
    one(path)  # warm-up
started = time.perf_counter()
for path in paths:
    one(path)
print(json.dumps({"films_per_s": len(paths) / (time.perf_counter() - started)}))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            status = Path(f"/proc/{current}/status").read_text()
            total += next(int(line.split()[1]) for line in status.splitlines()
                          if line.startswith("VmRSS")) / 1024
            pending += [int(c) for c in Path(f"/proc/{current}/task/{current}/children")
                        .read_text().split()]
        except (OSError, StopIteration):
            continue
    return total


def wait_for(check, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError("not ready in time")


def server(run: str, images: list[bytes], requests: int, clients: int, options: list[str],
           work: Path) -> dict:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "covidxray", "serve", run, "--port",
                                str(port), "--queue", str(clients), *options,
                                "--audit-db", f"sqlite:///{work / f'{port}.sqlite'}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(url + "/health", timeout=1).status_code == 200, 600)
        latencies, statuses, lock = [], [], threading.Lock()

        def client(count: int) -> None:
            with httpx.Client(timeout=600) as session:
                for index in range(count):
                    started = time.perf_counter()
                    answer = session.post(url + "/api/predict?heatmap=1", files=[
                        ("files", ("x.png", images[index % len(images)]))])
                    with lock:
                        latencies.append(time.perf_counter() - started)
                        statuses.append(answer.status_code)

        client(4)  # warm-up
        at_rest = rss_mb(process.pid)
        latencies.clear()
        statuses.clear()
        threads = [threading.Thread(target=client, args=(requests // clients,))
                   for _ in range(clients)]
        started = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        return {"requests_per_s": statuses.count(200) / wall,
                "p50_ms": 1000 * statistics.median(latencies),
                "p95_ms": 1000 * sorted(latencies)[int(0.95 * len(latencies)) - 1],
                "answered_200": statuses.count(200), "rss_at_rest_mb": at_rest}
    finally:
        process.terminate()
        process.wait(60)


def archive(run: str, folder: str, runtime: str, work: Path) -> dict:
    out = work / f"archive-{runtime}.csv"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "covidxray", "predict", run, folder, "--out",
                           str(out), "--runtime", runtime, "--quiet"], capture_output=True,
                          text=True)
    wall = time.perf_counter() - started
    summary = re.search(r"(\d+) files: .*; ([\d.]+) files/s", done.stdout)
    if summary is None:
        raise RuntimeError(f"covidxray predict --out said: {done.stdout}{done.stderr[-2000:]}")
    # files/s while scoring (what the job itself reports), and over the whole command
    return {"files_per_s": float(summary.group(2)), "files": int(summary.group(1)),
            "whole_command_files_per_s": int(summary.group(1)) / wall}


def node(run: str, film: Path, films: int, runtime: str, work: Path) -> dict:
    import pydicom
    from pydicom.uid import generate_uid
    from pynetdicom import AE
    source = pydicom.dcmread(film)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "covidxray", "dicom-node", run, "--port", str(port), "--out",
         str(work / f"node-{runtime}"), "--runtime", runtime,
         "--audit-db", f"sqlite:///{work / f'node-{runtime}.sqlite'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ae = AE(ae_title="BENCH")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)

    def echo() -> bool:
        assoc = ae.associate("127.0.0.1", port, ae_title="COVIDXRAY")
        ok = assoc.is_established and assoc.send_c_echo().Status == 0
        if assoc.is_established:
            assoc.release()
        return ok
    try:
        wait_for(echo, 600)
        assoc = ae.associate("127.0.0.1", port, ae_title="COVIDXRAY")
        for _ in range(2):  # warm-up
            source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            assoc.send_c_store(source)
        started = time.perf_counter()
        for _ in range(films):
            source.SOPInstanceUID = source.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            assoc.send_c_store(source)
        wall = time.perf_counter() - started
        assoc.release()
        return {"films_per_s": films / wall}
    finally:
        process.terminate()
        process.wait(60)


def ours(run: str, paths: list[str]) -> dict:
    import covidxray
    predictor = covidxray.load(run)
    for path in paths[:3]:
        predictor.predict(path, heatmap=True)  # warm-up
    started = time.perf_counter()
    for path in paths:
        predictor.predict(path, heatmap=True)
    return {"films_per_s": len(paths) / (time.perf_counter() - started)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--images", required=True, help="a folder of chest X-ray PNGs")
    parser.add_argument("--film", help="a chest DICOM for the node (default: none measured)")
    parser.add_argument("--requests", type=int, default=240)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--films", type=int, default=100)
    parser.add_argument("--xrv-python", help="an interpreter with torchxrayvision installed")
    args = parser.parse_args()
    paths = [str(p) for p in sorted(Path(args.images).glob("*.png"))[:args.films]]
    images = [Path(p).read_bytes() for p in paths[:40]]
    work = Path(tempfile.mkdtemp(prefix="runtime-bench-"))
    results = {}
    try:
        results["server keras, one request a pass"] = server(
            args.run, images, args.requests, args.clients,
            ["--runtime", "keras", "--batch-films", "1"], work)
        results["server onnx, shared passes"] = server(args.run, images, args.requests,
                                                       args.clients, [], work)
        for runtime in ("keras", "onnx"):
            folder = work / f"films-{runtime}"
            folder.mkdir()
            for path in paths:
                shutil.copy(path, folder)
            results[f"archive {runtime}"] = archive(args.run, str(folder), runtime, work)
            if args.film:
                results[f"node {runtime}"] = node(args.run, Path(args.film), args.films, runtime,
                                                  work)
        results["file to P(COVID) and heat map, covidxray"] = ours(args.run, paths)
        if args.xrv_python:
            done = subprocess.run([args.xrv_python, "-c", XRV_PIPELINE, json.dumps(paths)],
                                  capture_output=True, text=True)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
            else:
                results["file to P and heat map, torchxrayvision DenseNet-121"] = json.loads(
                    done.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, figures in results.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in figures.items()))
    base, new = results["server keras, one request a pass"], results["server onnx, shared passes"]
    print(f"server: requests/s x{new['requests_per_s'] / base['requests_per_s']:.2f}, p95 "
          f"x{new['p95_ms'] / base['p95_ms']:.2f}, memory at rest "
          f"{base['rss_at_rest_mb']:.0f} -> {new['rss_at_rest_mb']:.0f} MB")
    print(f"archive: files/s x{results['archive onnx']['files_per_s'] / results['archive keras']['files_per_s']:.2f}")  # noqa: E501
    if args.film:
        print(f"node: films/s x{results['node onnx']['films_per_s'] / results['node keras']['films_per_s']:.2f}")  # noqa: E501
    xrv = results.get("file to P and heat map, torchxrayvision DenseNet-121")
    if xrv:
        mine = results["file to P(COVID) and heat map, covidxray"]["films_per_s"]
        print(f"against torchxrayvision's pipeline: films/s x{mine / xrv['films_per_s']:.2f}")


if __name__ == "__main__":
    main()
