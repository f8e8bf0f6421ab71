"""One markdown table from several ``covidxray crossval`` results: a row per held-out source
(plus the random split and its raddb-only score), a column per recipe, and the thumbnail
baseline of the first recipe (the same folds for all: the split is seeded).

    python bench/loso_table.py NAME=cv1/crossval.json NAME=cv2/crossval.json ...

A recipe run with several seeds is given as comma-separated paths; its cell is then the mean
over the seeds with their range. A ``--baseline-only`` result is its thumbnail baseline.

    python bench/loso_table.py default=cv/default/crossval.json,cv/default-s1/crossval.json \\
        plain-thumbnail=cv/thumb-none/crossval.json,cv/thumb-none-s1/crossval.json

``--contrasts``: instead, a row per held-out fold, view and contrast (COVID against each other
original class: ``covidxray evaluate``'s ``contrasts``), e.g. the binary default against a
three-class model on held-out ieee8023 patients (bench/arms24.sh).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def cell(scores: list[dict | None]) -> str:
    """One run: its value and 95% interval; several seeds: their mean and range."""
    values = [s["value"] for s in scores if s and "value" in s]
    if not values or len(values) < len(scores):
        return "n/a (trained on)" if not any(scores) else "-"
    if len(values) == 1:
        low, high = scores[0]["ci95"]
        return f"{values[0]:.3f} ({low:.3f}-{high:.3f})"
    return f"{sum(values) / len(values):.3f} (seeds {min(values):.3f}-{max(values):.3f})"


def model_score(row: dict) -> dict | None:
    """A fold's model score, its thumbnail baseline where only the baseline ran, or None for
    a fold not scored (a source the arm trains on cannot be held out)."""
    if "skipped" in row:
        return None
    return row if "value" in row else row["thumbnail_baseline"]


def baseline_score(row: dict) -> dict | None:
    return row.get("thumbnail_baseline")


NOT_RUN = {"not_run": True}  # a random split this result did not run (--no-random-split)


def score_rows(result: dict, source: str, score=model_score) -> list[dict | None]:
    """The table's rows of one result: each fold, the random split, its ``source``-only score."""
    rows = [score(fold) for fold in result["folds"]]
    if "random_split" in result:
        split = score(result["random_split"])
        rows += [split, split and split.get("per_source", {}).get(source)]
    else:
        rows += [NOT_RUN, NOT_RUN]
    return rows


def seeds_cell(scores: list) -> str:
    """``cell`` of the seeds that ran the row, saying how many where some did not."""
    ran = [s for s in scores if s is not NOT_RUN]
    if not ran:
        return "not run"
    return cell(ran) + (f" ({len(ran)} of {len(scores)} seeds)" if len(ran) < len(scores)
                        else "")


def contrast_rows(result: dict, score=model_score) -> dict[tuple, dict]:
    """(fold, view, contrast) -> that contrast's ROC-AUC in one result (a contrast not scored
    there is absent)."""
    rows = {}
    for fold in result["folds"] + ([result["random_split"]] if "random_split" in result else []):
        found = score(fold)
        for group, contrasts in ((found or {}).get("contrasts") or {}).items():
            for name, value in contrasts.items():
                rows[(fold["fold"].removeprefix("holdout-"), group, name)] = value
    return rows


def print_contrasts(arms: dict[str, list[dict]]) -> None:
    """Each arm's column beside its own thumbnail baseline (arms that train on other sources
    have other baselines); "-": fewer than 10 films of a class there, so not scored; a fold
    that some seeds did not run (``--no-random-split``) says how many did."""
    columns = {}
    for name, results in arms.items():
        columns[name] = [contrast_rows(r) for r in results]
        columns[f"thumbnail LR ({name}'s folds)"] = [contrast_rows(r, baseline_score)
                                                     for r in results]
    keys = list(dict.fromkeys(k for column in columns.values() for rows in column
                              for k in rows))
    print("| held out | view | contrast | images | " + " | ".join(columns) + " |")
    print("|---|---|---|---|" + "---|" * len(columns))
    for key in keys:
        counts = dict.fromkeys(f"{v['n_positive']} vs {v['n'] - v['n_positive']}"
                               for column in columns.values() for rows in column
                               for v in [rows.get(key)] if v)
        cells = [seeds_cell([rows.get(key, NOT_RUN) for rows in column])
                 if any(key in rows for rows in column) else "-"
                 for column in columns.values()]
        print(f"| {key[0]} | {'all' if key[1] == 'all' else key[1] + ' only'} | {key[2]} | "
              f"{' / '.join(counts)} | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="+", metavar="NAME=PATH[,PATH...]")
    parser.add_argument("--source", default="raddb",
                        help="the source whose random-split score gets its own row")
    parser.add_argument("--contrasts", action="store_true",
                        help="COVID against each other class, per held-out fold and view")
    args = parser.parse_args(argv)
    arms = {}
    for item in args.results:
        name, paths = item.split("=", 1)
        arms[name] = [json.loads(Path(p).read_text()) for p in paths.split(",")]
    if args.contrasts:
        print_contrasts(arms)
        return
    first = next(iter(arms.values()))
    labels = [f"| {f['fold'].removeprefix('holdout-')} | {f['test_images']} "
              f"({f['test_positive']}) | {f.get('thumbnail_baseline', {}).get('metric', '-')} |"
              for f in first[0]["folds"]]
    with_split = [r for results in arms.values() for r in results if "random_split" in r]
    if with_split:
        split = with_split[0]["random_split"]
        labels += [f"| none (random split) | {split['test_images']} ({split['test_positive']}) "
                   f"| roc_auc |", f"| random split, {args.source} only | | roc_auc |"]
    columns = [[score_rows(r, args.source, baseline_score) for r in first]]
    columns += [[score_rows(r, args.source) for r in results] for results in arms.values()]
    print("| held out | images (COVID) | metric | thumbnail LR | " + " | ".join(arms) + " |")
    print("|---|---|---|---|" + "---|" * len(arms))
    for index, label in enumerate(labels):
        print(label + " " + " | ".join(seeds_cell([rows[index] for rows in column])
                                       for column in columns) + " |")
    minutes = {name: sum(f.get("train_seconds", 0) for r in results
                         for f in r["folds"] + [r.get("random_split", {})]) / 60
               for name, results in arms.items()}
    print("\ntraining time, all folds and seeds: "
          + ", ".join(f"{n} {m:.0f} min" for n, m in minutes.items()))


if __name__ == "__main__":
    main()
