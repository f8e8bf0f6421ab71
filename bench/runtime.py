"""Keras trains, onnxruntime answers (issue 33): each figure beside its baseline, measured in
one run on the same films.

    python bench/runtime.py RUN --images DIR [--seconds 30 --clients 8 --films 100]
        [--film CHEST.dcm] [--xrv-python /path/to/venv/bin/python] [--before OLD/src]

1. The server, one worker, loaded by wrk (``apt install wrk``), every answer with its heat
   map (the page's answer: preview, heat map and lung outline), then with the overlay as
   well: ``--runtime keras --batch-films 1`` (one request per forward pass, on Keras) and
   onnxruntime with ``--batch-films 1`` (before batching) against the default (onnxruntime,
   requests that arrive together sharing a pass): requests/s, p50 and p95 latency, and the
   worker's resident memory at rest. With ``--before``, an earlier
   checkout (the code before issue 33, as it answered) beside them, on the same run.
2. Archive scoring (``covidxray predict RUN DIR --out x.csv``) and the DICOM node (``--films``
   C-STOREs of the same chest film over one association): films/s, each way of answering.
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
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from processes import dicom_sender, free_port, rss_mb, wait_until

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


@dataclass
class Setup:
    """One way of answering: its name, the options that choose it, and its environment
    (``env``: an earlier checkout's ``src`` first on the path, or None for this one)."""
    name: str
    runtime: list[str]  # for predict and dicom-node
    server: list[str]  # for serve
    env: dict | None = None
    server_only: bool = False  # a way of serving alone (archive and node answer as another)


WRK_SCRIPT = Path(__file__).with_name("post_films.lua")
# what a client asks of the server: the page's answer (the heat map's layers), and the same
# with the overlay burnt in as well (every image an answer can carry)
ANSWERS = {"heat map": "heatmap=1", "heat map and overlay": "heatmap=1&overlay=1"}


def server(run: str, paths: list[str], seconds: int, clients: int, setup: Setup,
           work: Path) -> dict:
    """Requests/s and latency of one worker under ``clients`` connections that each POST one
    film after another for ``seconds``, by wrk (a load generator in C: the client's own work
    takes little of the two cores the server needs); each kind of answer in ``ANSWERS``."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "covidxray", "serve", run, "--port",
                                str(port), "--queue", str(clients), *setup.server,
                                "--audit-db", f"sqlite:///{work / f'{port}.sqlite'}"],
                               env=setup.env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url + "/health", timeout=1).status_code == 200, 600,
                   "the server's start")
        figures = {}
        for name, query in ANSWERS.items():
            load(f"{url}/api/predict?{query}", paths, 3, clients)  # warm-up
            time.sleep(3)  # what wrk left in flight is answered (it would hold queue places)
            if not figures:
                figures["rss_at_rest_mb"] = rss_mb(process.pid)
            done = load(f"{url}/api/predict?{query}", paths, seconds, clients)
            if done["non_2xx"] or done["socket_errors"]:
                raise RuntimeError(f"{setup.name}, {name}: {done}")
            figures[f"{name}: requests_per_s"] = done["requests"] / done["seconds"]
            figures[f"{name}: p50_ms"] = done["p50_ms"]
            figures[f"{name}: p95_ms"] = done["p95_ms"]
        return figures
    finally:
        process.terminate()
        process.wait(60)


def load(url: str, paths: list[str], seconds: int, clients: int) -> dict:
    """wrk's figures (``post_films.lua``) for ``clients`` connections over ``seconds``."""
    done = subprocess.run(["wrk", "-t", "1", "-c", str(clients), "-d", f"{seconds}s",
                           "--timeout", "60s", "-s", str(WRK_SCRIPT), url, "--", *paths],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def archive(run: str, folder: str, setup: Setup, work: Path) -> dict:
    out = work / f"archive-{setup.name}.csv"
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "covidxray", "predict", run, folder, "--out",
                           str(out), *setup.runtime, "--quiet"], capture_output=True,
                          text=True, env=setup.env)
    wall = time.perf_counter() - started
    summary = re.search(r"(\d+) files: .*; ([\d.]+) files/s", done.stdout)
    if summary is None:
        raise RuntimeError(f"covidxray predict --out said: {done.stdout}{done.stderr[-2000:]}")
    # files/s while scoring (what the job itself reports), and over the whole command
    return {"files_per_s": float(summary.group(2)), "files": int(summary.group(1)),
            "whole_command_files_per_s": int(summary.group(1)) / wall}


def node(run: str, film: Path, films: int, setup: Setup, work: Path) -> dict:
    import pydicom
    from pydicom.uid import generate_uid
    source = pydicom.dcmread(film)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "covidxray", "dicom-node", run, "--port", str(port), "--out",
         str(work / f"node-{setup.name}"), *setup.runtime,
         "--audit-db", f"sqlite:///{work / f'node-{setup.name}.sqlite'}"],
        env=setup.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ae, echoes = dicom_sender(source)
    try:
        wait_until(lambda: echoes(port), 600, "the node's start")
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
    parser.add_argument("--seconds", type=int, default=30,
                        help="how long the server is loaded, each way of answering")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--films", type=int, default=100)
    parser.add_argument("--xrv-python", help="an interpreter with torchxrayvision installed")
    parser.add_argument("--before", help="the src folder of an earlier covidxray checkout "
                                         "(e.g. a worktree of the commit before issue 33), "
                                         "measured beside the others as it answers")
    args = parser.parse_args()
    paths = [str(p) for p in sorted(Path(args.images).glob("*.png"))[:args.films]]
    if shutil.which("wrk") is None:
        parser.error("wrk loads the server: apt install wrk")
    work = Path(tempfile.mkdtemp(prefix="runtime-bench-"))
    setups = [Setup("keras", ["--runtime", "keras"], ["--runtime", "keras", "--batch-films", "1"]),
              Setup("onnx, one film a pass", [], ["--batch-films", "1"], server_only=True),
              Setup("onnx", [], [])]
    if args.before:
        setups.insert(0, Setup("before", [], [], {**os.environ, "PYTHONPATH": args.before}))
    results = {}
    try:
        # the run's ONNX export made (or found) in the cache first: every figure below is of a
        # process that finds it, as every process after the first does
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "covidxray", "predict", args.run, paths[0]],
                       check=True, capture_output=True)
        results["first predict (exports the run if the cache lacks it)"] = {
            "seconds": time.perf_counter() - started}
        for setup in setups:
            results[f"server {setup.name}"] = server(args.run, paths[:40], args.seconds,
                                                     args.clients, setup, work)
            if setup.server_only:
                continue
            folder = work / f"films-{setup.name}"
            folder.mkdir()
            for path in paths:
                shutil.copy(path, folder)
            results[f"archive {setup.name}"] = archive(args.run, str(folder), setup, work)
            if args.film:
                results[f"node {setup.name}"] = node(args.run, Path(args.film), args.films,
                                                     setup, work)
        if args.xrv_python:  # three pairs, in turn: one pair can catch the machine busy
            for pair in range(3):
                results[f"file to P(COVID) and heat map, covidxray, pair {pair}"] = ours(
                    args.run, paths)
                done = subprocess.run([args.xrv_python, "-c", XRV_PIPELINE, json.dumps(paths)],
                                      capture_output=True, text=True, check=True)
                results[f"file to P and heat map, torchxrayvision DenseNet-121, pair {pair}"] = \
                    json.loads(done.stdout.splitlines()[-1])
        else:
            results["file to P(COVID) and heat map, covidxray"] = ours(args.run, paths)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name, figures in results.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                      for k, v in figures.items()))
    new = results["server onnx"]
    for base in [s.name for s in setups if s.name != "onnx"]:
        old = results[f"server {base}"]
        for answer in ANSWERS:
            print(f"onnx against {base}, {answer}: server requests/s x"
                  f"{new[f'{answer}: requests_per_s'] / old[f'{answer}: requests_per_s']:.2f}, "
                  f"p95 x{new[f'{answer}: p95_ms'] / old[f'{answer}: p95_ms']:.2f}")
        if f"archive {base}" not in results:
            continue
        print(f"onnx against {base}: memory at rest {old['rss_at_rest_mb']:.0f} -> "
              f"{new['rss_at_rest_mb']:.0f} MB; archive files/s x"
              f"{results['archive onnx']['files_per_s'] / results[f'archive {base}']['files_per_s']:.2f}"  # noqa: E501
              + (f"; node films/s x{results['node onnx']['films_per_s'] / results[f'node {base}']['films_per_s']:.2f}"  # noqa: E501
                 if args.film else ""))
    if args.xrv_python:
        ratios = [results[f"file to P(COVID) and heat map, covidxray, pair {pair}"]["films_per_s"]
                  / results[f"file to P and heat map, torchxrayvision DenseNet-121, pair {pair}"]
                  ["films_per_s"] for pair in range(3)]
        print("against torchxrayvision's pipeline: films/s x" +
              " / x".join(f"{r:.2f}" for r in ratios) + f" (median x{statistics.median(ratios):.2f})")


if __name__ == "__main__":
    main()
