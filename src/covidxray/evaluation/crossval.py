"""Leave-one-source-out cross-validation: train on every source but one, test on that one.

A random split of the same data sits beside it, so the gap between "in-house" and "new
hospital" performance is measured, not assumed.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from covidxray.config import Preprocessing, TrainConfig
from covidxray.data.dataset import DataError, Record, discover
from covidxray.data.sources import select_sources
from covidxray.data.split import assign_splits
from covidxray.errors import ConfigError
from covidxray.evaluation.baselines import THUMBNAIL_SIZE, thumbnail_logistic_regression
from covidxray.evaluation.evaluate import contrasts, evaluate, per_source, summarise
from covidxray.evaluation.text import format_metric
from covidxray.fileutil import folder_lock, write_json_atomic, write_text_atomic
from covidxray.progress import Steps
from covidxray.run.folder import METRICS, RunFolder
from covidxray.training.fit import RunExistsError, segmenter_of, train

log = logging.getLogger(__name__)


def _write_manifest(path: Path, records: list[Record]) -> Path:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["file", "label", "patient_id", "source", "split", "view"])
    for r in records:
        writer.writerow([str(Path(r.path).resolve()), r.label, r.patient_id, r.source, r.split,
                         r.view])
    write_text_atomic(path, buffer.getvalue())
    return path


def fold_score(metrics: dict) -> dict:
    """The metric a held-out set can support: ROC-AUC with both classes, else the rate of the
    one class it has (sensitivity for positives only, specificity for negatives only)."""
    overall = metrics["overall"]
    if 0 < overall["n_positive"] < overall["n"]:
        name = "roc_auc"
    else:
        name = "sensitivity" if overall["n_positive"] else "specificity"
    return {"metric": name, "value": overall["metrics"][name]["value"],
            "ci95": overall["metrics"][name]["ci95"]}


def _baseline_score(records: list[Record], positive_class: str, config: TrainConfig,
                    n_bootstrap: int) -> dict:
    """The thumbnail logistic regression on the same train / validation / test records."""
    split = {s: [r for r in records if r.split == s] for s in ("train", "val", "test")}
    baseline = thumbnail_logistic_regression(split["train"], split["val"], split["test"],
                                             Preprocessing(THUMBNAIL_SIZE, config.intensity,
                                                           config.crop),
                                             threshold_method=config.threshold_method,
                                             target_sensitivity=config.target_sensitivity,
                                             segmenter=segmenter_of(config))
    y_true = np.array([r.target for r in baseline.test_records], dtype=int)
    overall = summarise(y_true, baseline.test_scores, baseline.threshold, n_bootstrap,
                        config.seed)
    return {"name": baseline.name, "threshold": baseline.threshold,
            **fold_score({"overall": overall}),
            "per_source": {s: fold_score({"overall": v}) for s, v in per_source(
                baseline.test_records, baseline.test_scores, baseline.threshold, n_bootstrap,
                config.seed).items()},
            "contrasts": contrasts(baseline.test_records, baseline.test_scores,
                                   positive_class, n_bootstrap, config.seed)}


def _train_and_score(records: list[Record], positive_class: str, name: str,
                     config: TrainConfig, out: Path, n_bootstrap: int, train_model: bool = True,
                     resume: bool = False, trained_run: Path | None = None) -> dict:
    """Train on ``records``' train / val split and test on their test split; with
    ``trained_run`` (a fold run trained on the very same records), only test it."""
    fold_dir = out / name
    finished = fold_dir / "fold.json"
    if resume and finished.is_file():
        log.info("%s: finished earlier, result reused", name)
        return json.loads(finished.read_text())
    test = [r for r in records if r.split == "test"]
    row = {"fold": name, "test_images": len(test), "test_positive": sum(r.target for r in test),
           "trained_on": sorted({r.source for r in records if r.split != "test"}),
           "thumbnail_baseline": _baseline_score(records, positive_class, config, n_bootstrap)}
    if not train_model:
        return row
    run = trained_run or fold_dir / "run"
    continued = resume and trained_run is None and RunFolder(run).config_file.is_file()
    started = time.monotonic()  # train_seconds: this call's part only
    if not RunFolder(run).keras_file.is_file():
        manifest = _write_manifest(fold_dir / "data.csv", records)
        train(replace(config, data=str(manifest), out=str(run), split_file=None,
                      source_from_prefix=False, sources=None, exclude_sources=(),
                      exclude_confounded=False), resume=continued, verbose=0)
    seconds = time.monotonic() - started if trained_run is None else 0.0
    metrics = evaluate(run, n_bootstrap=n_bootstrap, seed=config.seed, shortcut_images=0,
                       out=fold_dir / METRICS, records=test)
    row = {**row, "run": str(run), "train_seconds": round(seconds, 1), "resumed": continued,
           "threshold": metrics.threshold, **fold_score(metrics.to_dict()),
           "metrics": {k: v["value"] for k, v in metrics.overall["metrics"].items()},
           "per_source": {s: fold_score({"overall": v})
                          for s, v in metrics.per_source.items()},
           # how the prediction sets' promise held on the held-out data, per class
           "prediction_sets": metrics.prediction_sets,
           "contrasts": metrics.contrasts,
           "drift": metrics.drift,
           "lungs": metrics.lungs}
    write_json_atomic(finished, row)
    return row


def _claim(out: Path, config: TrainConfig, resume: bool) -> None:
    """Record the recipe of a cross-validation in ``out``; one that is there already may only
    be continued (``resume``) with the same recipe, so no table mixes two recipes' folds."""
    saved = RunFolder(out).config_file  # the recipe of every fold's run
    wanted = json.loads(json.dumps(config.to_dict()))
    if not saved.is_file():
        write_json_atomic(saved, wanted)
        return
    if not resume:
        raise RunExistsError(f"{out} already holds a cross-validation: use --resume to "
                             f"continue it, or another --out")
    earlier = json.loads(saved.read_text())
    changed = sorted(k for k in set(earlier) | set(wanted) if earlier.get(k) != wanted.get(k))
    if changed:
        raise ConfigError(f"{out}: the cross-validation there has other settings "
                         f"({', '.join(changed)}); continue it with the same options, or use "
                         f"another --out")


def crossval(data: str | Path, out: str | Path, config: TrainConfig, by: str = "source",
             random_split: bool = True, n_bootstrap: int = 500,
             train_models: bool = True, resume: bool = False) -> dict:
    """Train one model per held-out ``by`` value (only "source" for now), plus one on a random
    split, and score the thumbnail baseline on the same folds; returns and writes
    ``out/crossval.json`` and ``out/crossval.csv``. Without ``train_models``, only the baseline
    (seconds instead of hours). With ``resume``, an interrupted cross-validation in ``out``
    continues: finished folds are reused and an interrupted fold run resumes."""
    if by != "source":
        raise ConfigError(f"crossval --by {by!r} is not supported (use source)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with folder_lock(out, "covidxray crossval"):
        return _crossval(data, out, config, by, random_split, n_bootstrap, train_models, resume)


def _crossval(data, out: Path, config: TrainConfig, by: str, random_split: bool,
              n_bootstrap: int, train_models: bool, resume: bool) -> dict:
    dataset = discover(data, config.positive_class, config.source_from_prefix, config.strict,
                       config.patient_aliases, config.source_aliases)
    missing = [r.path for r in dataset.records if not r.source]
    if missing:
        raise DataError(f"{len(missing)} images have no source (e.g. {missing[0]}); give a "
                        f"source column or use --source-from-prefix")
    sources = sorted({r.source for r in dataset.records})
    if len(sources) < 2:
        raise DataError(f"leave-one-source-out needs at least two sources, found {sources}")
    plain = [replace(r, split="") for r in dataset.records]
    pool, left_out = select_sources(plain, config.sources, config.exclude_sources,
                                    config.exclude_confounded, by_share=not config.classes)
    for source, reason in left_out.items():
        log.info("source %s is only tested, never trained on: %s", source, reason)
    if train_models:
        _claim(out, config, resume)
    train_share = config.split_fractions[0] / (config.split_fractions[0]
                                               + config.split_fractions[1])
    folds, runs = [], {}  # runs: training sources -> the fold run trained on them
    steps = Steps(len(sources) + bool(random_split), "fold")
    for held in sources:
        steps.start(f"hold out {held}")
        training = [r for r in pool if r.source != held]
        test = [replace(r, split="test") for r in plain if r.source == held]
        trained_on = tuple(sorted({r.source for r in training}))
        if len({r.target for r in training}) < 2:
            folds.append({"fold": f"holdout-{held}", "test_images": len(test),
                          "test_positive": sum(r.target for r in test),
                          "skipped": f"the training sources without {held} "
                                     f"({', '.join(trained_on) or 'none'}) lack a class: a "
                                     f"source trained on cannot also be held out"})
            steps.finish()
            continue
        rest = assign_splits(training, (train_share, 1 - train_share, 0.0), config.seed)
        row = _train_and_score(rest + test, dataset.positive_class, f"holdout-{held}", config,
                               out, n_bootstrap, train_models, resume, runs.get(trained_on))
        runs.setdefault(trained_on, Path(row["run"]) if "run" in row else None)
        folds.append(row)
        steps.finish()
    result = {"data": str(data), "by": by, "synthetic_data": dataset.synthetic,
              "config": config.to_dict(), "sources_left_out": left_out, "folds": folds}
    if random_split:
        steps.start("random split of " + ("the sources trained on" if left_out else "all sources"))
        result["random_split"] = _train_and_score(
            assign_splits(pool, config.split_fractions, config.seed), dataset.positive_class,
            "random-split", config, out, n_bootstrap, train_models, resume)
    write_json_atomic(out / "crossval.json", result)
    rows = [f for f in folds if "skipped" not in f] + (
        [result["random_split"]] if random_split else [])
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["fold", "test_images", "test_positive", "metric", "value", "ci_low",
                     "ci_high", "threshold", "train_seconds", "thumbnail_value",
                     "thumbnail_ci_low", "thumbnail_ci_high"])
    for row in rows:
        base = row["thumbnail_baseline"]
        model = [row["metric"], f"{row['value']:.4f}", f"{row['ci95'][0]:.4f}",
                 f"{row['ci95'][1]:.4f}", f"{row['threshold']:.4f}", row["train_seconds"]] \
            if "value" in row else [base["metric"], "", "", "", "", ""]
        writer.writerow([row["fold"], row["test_images"], row["test_positive"], *model,
                         f"{base['value']:.4f}", f"{base['ci95'][0]:.4f}",
                         f"{base['ci95'][1]:.4f}"])
    write_text_atomic(out / "crossval.csv", buffer.getvalue())
    return result


def format_crossval(result: dict) -> str:
    lines = []
    if result["synthetic_data"]:
        lines.append("*** SYNTHETIC DATA ***")
    lines.append(f"{'held out':<22}{'images':>8}{'COVID':>7}  {'metric':<12}{'model':>7}  "
                 f"{'95% CI':<12}  {'thumbnail LR':>12}  95% CI")
    rows = result["folds"] + ([result["random_split"]] if "random_split" in result else [])
    for row in rows:
        if "skipped" in row:
            lines.append(f"{row['fold']:<22}{row['test_images']:>8}{row['test_positive']:>7}  "
                         f"not scored: {row['skipped']}")
            continue
        base = row["thumbnail_baseline"]
        model = (f"{row['value']:>7.3f}  {row['ci95'][0]:.3f}-{row['ci95'][1]:.3f}"
                 if "value" in row else f"{'-':>7}  {'':<11}")
        lines.append(f"{row['fold']:<22}{row['test_images']:>8}{row['test_positive']:>7}  "
                     f"{base['metric']:<12}{model}  {base['value']:>12.3f}  "
                     f"{base['ci95'][0]:.3f}-{base['ci95'][1]:.3f}")
    for row in rows:
        sets = row.get("prediction_sets")
        if sets and "skipped" not in row:
            cover = ", ".join(f"{name} {c['coverage']:.0%}" for name, c in
                              sets["per_class"].items())
            lines.append(f"{row['fold']}: prediction sets at {sets['confidence']:.0%} cover "
                         f"{cover}; uncertain {sets['uncertain_rate']:.0%}")
    for row in rows:  # COVID against each other original class, in each view
        if "skipped" in row:
            continue
        scored = {"model": row.get("contrasts") or {},
                  "thumbnail LR": row["thumbnail_baseline"].get("contrasts") or {}}
        for group in dict.fromkeys(g for found in scored.values() for g in found):
            names = dict.fromkeys(n for found in scored.values() for n in found.get(group, {}))
            for name in names:
                by_who = {who: found[group][name] for who, found in scored.items()
                          if name in found.get(group, {})}
                value = next(iter(by_who.values()))  # both score the same held-out films
                lines.append(f"{row['fold']}, {'all views' if group == 'all' else group}: "
                             f"{name} ({value['n_positive']} vs "
                             f"{value['n'] - value['n_positive']} images) ROC-AUC "
                             + ", ".join(f"{who} {format_metric(v)}"
                                         for who, v in by_who.items()))
    for source, reason in result.get("sources_left_out", {}).items():
        lines.append(f"{source} was never trained on ({reason}); it is only held out.")
    lines.append("A held-out source with one class is scored by the rate of that class at the "
                 "threshold frozen on the training sources' validation split. Thumbnail LR: "
                 "logistic regression on 16x16-pixel thumbnails, same folds: what image "
                 "statistics alone achieve.")
    return "\n".join(lines)
