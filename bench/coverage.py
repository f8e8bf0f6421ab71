"""How the prediction sets' promise holds on a run's own test split, at several levels.

    python bench/coverage.py runs/default-s0 runs/default-s1 runs/default-s2 --levels 0.90 0.95

For each run: its test films' final P(COVID) (the run's own ``Predictor``), their sets at each
level from the run's calibration (``run.conformal``), and per class the coverage (the share
whose set holds their class) and the uncertain and unlike rates; then the mean over the runs.
"""

from __future__ import annotations

import argparse

import numpy as np

import covidxray  # noqa: F401  (sets the Keras backend)
from covidxray.evaluation.evaluate import prepared_images, run_test_records
from covidxray.run.conformal import coverage
from covidxray.run.predictor import Predictor


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--levels", nargs="+", type=float, default=[0.90, 0.95])
    args = parser.parse_args()
    table = {}
    for run in args.runs:
        predictor = Predictor.load(run)
        records = run_test_records(predictor.run_dir, predictor.positive_class, False)
        loaded, _ = prepared_images(predictor, records)
        scores = predictor.predict_prepared(loaded.images)
        classes = predictor.conformal.classes
        truth = [classes[r.target] for r in loaded.records]
        for level in args.levels:
            sets = predictor.conformal.sets(scores, level)
            for name, c in coverage(sets, truth, classes).items():
                table.setdefault((level, name), []).append(c)
    print("| level | class | runs | films per run | coverage (mean; runs) | uncertain | unlike |")
    print("|---:|---|---:|---:|---|---:|---:|")
    for (level, name), runs in sorted(table.items()):
        values = [c["coverage"] for c in runs]
        print(f"| {level:.2f} | {name} | {len(runs)} | {runs[0]['n']} | {np.mean(values):.3f} ("
              + ", ".join(f"{v:.3f}" for v in values) + f") | "
              f"{np.mean([c['uncertain'] for c in runs]):.3f} | "
              f"{np.mean([c['unlike'] for c in runs]):.3f} |")


if __name__ == "__main__":
    main()
