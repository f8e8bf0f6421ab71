"""The lung test alone: the share of films whose lungs the segmenter judges implausible, per
cxr-dev source and per kind of not-frontal image (docs/benchmarks.md, the gate by kind).

    python bench/lung_rates.py ../shared/data/cxr-dev ../shared/data/not-frontal [--model DIR]

A cxr-dev film's source is its file name's prefix; a not-frontal file's kind its manifest's
``kind`` column. Prints, per group, the films flagged and the three commonest reasons.
"""

from __future__ import annotations

import argparse
import csv
from collections import Counter, defaultdict
from pathlib import Path

from covidxray.model.lungs import LungSegmenter
from covidxray.pixels.decode import read_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("frontal", help="cxr-dev (PNG files named SOURCE_...)")
    parser.add_argument("not_frontal", help="not-frontal (its manifest.csv names each kind)")
    parser.add_argument("--model", help="a segmenter folder (default: the shipped one)")
    args = parser.parse_args()
    segmenter = LungSegmenter.load(args.model)
    items = [(p, p.name.split("_")[0]) for p in sorted(Path(args.frontal).rglob("*.png"))]
    with open(Path(args.not_frontal) / "manifest.csv", newline="") as handle:
        items += [(Path(args.not_frontal) / row["file"], f"not-frontal {row['kind']}")
                  for row in csv.DictReader(handle)]
    flagged, totals, reasons = Counter(), Counter(), defaultdict(Counter)
    for path, group in items:
        field = segmenter.field(read_image(str(path)))
        totals[group] += 1
        if not field.plausible:
            flagged[group] += 1
            reasons[group][field.reason.split(" (")[0][:60]] += 1
    print("| films | flagged | reasons (commonest three) |\n|---|---:|---|")
    for group in sorted(totals):
        common = "; ".join(f"{why}: {n}" for why, n in reasons[group].most_common(3))
        print(f"| {group} | {flagged[group]} of {totals[group]} "
              f"({flagged[group] / totals[group]:.1%}) | {common} |")


if __name__ == "__main__":
    main()
