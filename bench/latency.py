"""Latency of one prediction with a trained run, as a user's script sees it.

    python bench/latency.py RUN ../shared/data/cxr-dev/COVID ../shared/data/cxr-dev/NORMAL

Loads the run once, warms up, then times ``Predictor.predict(path)`` on each of up to ``--n``
files from each folder (decode, model, gate; then again with the Grad-CAM heat map), and
``predict_paths`` on all of them at once.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import covidxray


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--n", type=int, default=25, help="files per folder")
    args = parser.parse_args(argv)
    predictor = covidxray.load(args.run)
    files = [f for folder in args.folders for f in sorted(Path(folder).glob("*.png"))[:args.n]]
    predictor.predict(files[0])
    predictor.predict(files[1], heatmap=True)
    for heatmap in (False, True):
        times = []
        for path in files:
            started = time.perf_counter()
            predictor.predict(path, heatmap=heatmap)
            times.append(time.perf_counter() - started)
        print(f"predict(path{', heatmap=True' if heatmap else ''}): median "
              f"{1000 * statistics.median(times):.0f} ms, p95 "
              f"{1000 * sorted(times)[int(0.95 * len(times)) - 1]:.0f} ms over {len(times)}")
    started = time.perf_counter()
    predictor.predict_paths(files)
    print(f"predict_paths: {len(files) / (time.perf_counter() - started):.1f} images/s")


if __name__ == "__main__":
    main()
