"""Archive scoring and the exported model, each figure beside its baseline from the same run.

    python bench/archive.py RUN ../shared/data/cxr-dev --files 1000 --memory-run SMALL_RUN

1. ``covidxray predict --out`` on the same ``--files`` files: Ray Data with 1 and 2 scoring
   actors against the plain local engine (the Ray figures include starting Ray and loading
   the model in each actor, as a user's job pays them).
2. The run exported to ONNX under onnxruntime against the run under Keras: one image at a time
   (``predict(path)``, median) and a batch of 64 prepared images.
3. Memory of a 20,000-file job (``--memory-run``, a small model: the pipeline, not the model,
   is measured): the scoring process's resident memory after every 1,000 files.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import covidxray
from covidxray.api import score
from covidxray.deploy import batch
from covidxray.run.inputs import collect_paths


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines()
                    if line.startswith("VmRSS"))) / 1024


def listing(files: list[str], path: Path) -> Path:
    path.write_text("path\n" + "\n".join(files) + "\n")
    return path


def engines(run: str, files: list[str], folder: Path) -> None:
    source = listing(files, folder / "files.csv")
    timings = {}
    for name, options in (("local", {}), ("ray, 1 actor", {"engine": "ray", "workers": 1}),
                          ("ray, 2 actors", {"engine": "ray", "workers": 2})):
        out = folder / f"{name.replace(' ', '').replace(',', '-')}.parquet"
        started = time.perf_counter()
        done = score(run, [source], out, quiet=True, **options)
        timings[name] = time.perf_counter() - started
        print(f"{name}: {done['scored']} files in {timings[name]:.1f} s "
              f"({done['scored'] / timings[name]:.1f} files/s)", flush=True)
    for name, seconds in timings.items():
        print(f"  {name}: x{timings['local'] / seconds:.2f} the local engine's files/s")


def exported(run: str, files: list[str], folder: Path) -> None:
    covidxray.export(run, folder / "onnx")
    keras_run, onnx_run = covidxray.load(run), covidxray.load(folder / "onnx")
    sample = files[:40]
    images = np.stack([keras_run.prepare(f).image for f in files[:64]])
    for predictor in (keras_run, onnx_run):  # warm-up
        predictor.predict(sample[0])
        predictor.predict_prepared(images[:8])
    rows = {}
    for name, predictor in (("keras", keras_run), ("onnxruntime", onnx_run)):
        single = []
        for path in sample:
            started = time.perf_counter()
            predictor.predict(path)
            single.append(time.perf_counter() - started)
        started = time.perf_counter()
        predictor.predict_prepared(images, batch_size=64)
        rows[name] = (statistics.median(single), time.perf_counter() - started)
        print(f"{name}: one image {1000 * rows[name][0]:.0f} ms (median of {len(sample)}), "
              f"a batch of 64 {1000 * rows[name][1]:.0f} ms", flush=True)
    single, batched = (rows["keras"][i] / rows["onnxruntime"][i] for i in (0, 1))
    print(f"  onnxruntime against keras: one image x{single:.2f} as fast, a batch "
          f"x{batched:.2f}")


def memory(run: str, data: str, folder: Path, n: int = 20_000) -> None:
    """20,000 paths (links to the data set's files, over and over) scored into a CSV, the
    process's resident memory read after each 1,000."""
    originals = collect_paths([data])
    links = folder / "archive"
    links.mkdir()
    for index in range(n):
        (links / f"{index:05d}.png").symlink_to(originals[index % len(originals)])
    source = listing([str(p) for p in sorted(links.iterdir())], folder / "archive.csv")
    readings, original = [], batch.CsvResults

    class Watched(original):
        def write(self, rows):
            super().write(rows)
            readings.append(rss_mb())

    batch.CsvResults = Watched
    try:
        started = time.perf_counter()
        done = batch.score(run, [source], folder / "results.csv", chunk=1000, quiet=True)
    finally:
        batch.CsvResults = original
    seconds = time.perf_counter() - started
    print(f"memory: {done['scored']} files in {seconds:.0f} s; resident MB after each 1,000: "
          + ", ".join(f"{r:.0f}" for r in readings))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"  after 1,000: {readings[0]:.0f} MB, after {n}: {readings[-1]:.0f} MB "
          f"(x{readings[-1] / readings[0]:.2f}); peak {peak:.0f} MB")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("data", help="a folder of X-rays")
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--memory-run", help="a small run for the 20,000-file job")
    parser.add_argument("--skip", nargs="*", default=[], choices=["engines", "export", "memory"])
    args = parser.parse_args(argv)
    files = collect_paths([args.data])[:args.files]
    folder = Path(tempfile.mkdtemp(prefix="archive-bench-"))
    try:
        if "engines" not in args.skip:
            engines(args.run, files, folder)
        if "export" not in args.skip:
            exported(args.run, files, folder)
        if args.memory_run and "memory" not in args.skip:
            memory(args.memory_run, args.data, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
