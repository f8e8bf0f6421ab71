"""One markdown table from several ``covidxray crossval`` results: a row per held-out source
(plus the random split and its raddb-only score), a column per recipe, and the thumbnail
baseline of the first result (the same folds for all: the split is seeded).

    python bench/loso_table.py NAME=cv1/crossval.json NAME=cv2/crossval.json ...
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell(score: dict | None) -> str:
    if not score or "value" not in score:
        return "-"
    low, high = score["ci95"]
    return f"{score['value']:.3f} ({low:.3f}-{high:.3f})"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", metavar="NAME=PATH")
    parser.add_argument("--source", default="raddb",
                        help="the source whose random-split score gets its own row")
    args = parser.parse_args(argv)
    arms = {}
    for item in args.results:
        name, path = item.split("=", 1)
        arms[name] = json.loads(Path(path).read_text())
    first = next(iter(arms.values()))
    names = list(arms)
    print("| held out | images (COVID) | metric | thumbnail LR | " + " | ".join(names) + " |")
    print("|---|---|---|---|" + "---|" * len(names))
    for index, fold in enumerate(first["folds"]):
        rows = [arm["folds"][index] for arm in arms.values()]
        print(f"| {fold['fold'].removeprefix('holdout-')} | {fold['test_images']} "
              f"({fold['test_positive']}) | {fold['thumbnail_baseline']['metric']} | "
              f"{cell(fold['thumbnail_baseline'])} | " + " | ".join(cell(r) for r in rows)
              + " |")
    if "random_split" in first:
        split = first["random_split"]
        rows = [arm.get("random_split") for arm in arms.values()]
        print(f"| none (random split) | {split['test_images']} ({split['test_positive']}) | "
              f"roc_auc | {cell(split['thumbnail_baseline'])} | "
              + " | ".join(cell(r) for r in rows) + " |")
        print(f"| random split, {args.source} only | | roc_auc | "
              f"{cell(split['thumbnail_baseline']['per_source'].get(args.source))} | "
              + " | ".join(cell((r or {}).get('per_source', {}).get(args.source)) for r in rows)
              + " |")
    seconds = {name: sum(f.get("train_seconds", 0) for f in arm["folds"])
               + arm.get("random_split", {}).get("train_seconds", 0)
               for name, arm in arms.items()}
    print("\ntraining time, all folds: " + ", ".join(f"{n} {s / 60:.0f} min"
                                                    for n, s in seconds.items()))


if __name__ == "__main__":
    main()
