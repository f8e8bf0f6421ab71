"""An evaluation in words, for the terminal: the metrics with their intervals, per source and
per class, the tests of where the model looks (shortcut, lungs hidden), what the prediction
sets did."""

from __future__ import annotations

import numpy as np

from covidxray.evaluation.result import EvaluationResult
from covidxray.metrics import METRIC_NAMES


def format_metric(metric: dict) -> str:
    """A metric's value and its 95% interval ("n/a" where it could not be scored)."""
    value, (low, high) = metric["value"], metric["ci95"]
    if not np.isfinite(value):
        return "n/a"
    return f"{value:.3f} ({low:.3f}-{high:.3f})" if np.isfinite(low) else f"{value:.3f}"


def format_report(result: EvaluationResult) -> str:
    """A readable table of an ``evaluate`` result."""
    overall = result.overall
    lines = []
    if result.synthetic_data:
        lines.append("*** SYNTHETIC DATA: these numbers say nothing about real X-rays ***")
    lines += [f"{result.notice}",
              f"data: {result.data}  images: {overall['n']} "
              f"({overall['n_positive']} {result.positive_class})  "
              f"threshold: {result.threshold:.4f} ({result.threshold_method}, frozen on "
              f"validation)", "",
              f"{'metric':<12} value (95% bootstrap CI)"]
    lines += [f"{name:<12} {format_metric(overall['metrics'][name])}" for name in METRIC_NAMES]
    c = overall["confusion"]
    lines += ["", "confusion matrix   predicted +   predicted -",
              f"  actual +         {c['tp']:>11}   {c['fn']:>11}",
              f"  actual -         {c['fp']:>11}   {c['tn']:>11}"]
    lines += ["", f"calibration: expected calibration error {result.calibration['ece']:.3f}"
              + (f" (temperature {result.calibration['temperature']:.3f})"
                 if result.calibration.get("temperature") else "")]
    drift = result.drift
    if drift:
        lines += ["", drift["verdict"]]
    sets = result.prediction_sets
    if sets:
        lines += ["", f"prediction sets at {sets['confidence']:.0%} confidence (each class's films "
                  f"should be covered at least that often, if they are like the validation "
                  f"films): uncertain {sets['uncertain_rate']:.1%}, unlike the calibration data "
                  f"{sets['unlike_rate']:.1%}"]
        lines += [f"  {name:<16} coverage {c['coverage']:.1%} of {c['n']}, uncertain "
                  f"{c['uncertain']:.1%}, unlike {c['unlike']:.1%}"
                  for name, c in sets["per_class"].items()]
    lungs = result.lungs or {}
    if lungs.get("heat_in_lungs") is not None:
        lines += ["", f"heat in the lungs: {lungs['heat_in_lungs']:.0%} of the Grad-CAM heat lies "
                  f"inside the lungs found on {lungs['lungs_found']} of {lungs['images']} images "
                  f"(an even spread: {lungs['lung_area_share']:.0%}, their area)"]
        lines += [f"  {name:<16} {share:.0%}" for name, share in
                  {**lungs["per_class"], **lungs["per_source"]}.items()]
    elif lungs and not lungs.get("segmenter"):
        lines += ["", "heat in the lungs: not measured (no lung segmenter installed)"]
    lines += format_lungs_hidden(result.lungs_hidden)
    if result.shortcut:
        lines += ["", "shortcut check (border vs centre, lungs vs the rest):",
                  "  " + result.shortcut["verdict"]]
    if result.per_source:
        lines += ["", "per source (a source with one class cannot show discrimination):",
                  f"  {'source':<14}{'n':>6}{'pos':>6}  {'sensitivity':<24}{'specificity':<24}"
                  f"roc_auc"]
        for source, s in result.per_source.items():
            m = s["metrics"]
            lines.append(f"  {source:<14}{s['n']:>6}{s['n_positive']:>6}  "
                         f"{format_metric(m['sensitivity']):<24}"
                         f"{format_metric(m['specificity']):<24}{format_metric(m['roc_auc'])}")
    table = result.classes
    if table:
        names = table["classes"]
        lines += ["", f"{len(names)} classes, the most probable one against each film's own "
                  f"(accuracy {table['accuracy']:.3f}):",
                  "  actual \\ called  " + "".join(f"{n:>12}" for n in names)
                  + "    recall  precision"]
        for name, row in zip(names, table["confusion"]):
            c = table["per_class"][name]
            lines.append(f"  {name:<16}" + "".join(f"{v:>12}" for v in row)
                         + f"    {c['recall']:.3f}   {c['precision']:.3f}")
    for group, found in (result.contrasts or {}).items():
        lines += ["", f"by original class ({'all views' if group == 'all' else group + ' only'}):"]
        lines += [f"  {name:<28} ROC-AUC {format_metric(value)}  ({value['n_positive']} vs "
                  f"{value['n'] - value['n_positive']} images)" for name, value in found.items()]
    lines += ["", "called positive per original class:"]
    lines += [f"  {label:<16} {c['called_positive']:>5} of {c['n']:<5} "
              f"({c['called_positive_rate']:.1%})" for label, c in result.per_class.items()]
    if result.unreadable_files:
        lines += ["", f"{len(result.unreadable_files)} unreadable files skipped"]
    return "\n".join(lines)


def format_lungs_hidden(found: dict | None) -> list[str]:
    """The lungs-hidden test's lines for the terminal (none where it was not run)."""
    if not found:
        return []
    lines = ["", f"lungs hidden (Maguolo and Nanni 2021): ROC-AUC on the "
             f"{found['films_with_lungs']} of {found['films']} films with plausible lungs"]
    if found["overall"] is None:
        return lines + ["  not scored: those films hold one class only"]
    lines.append(f"  {'films':<16}{'n':>6}{'pos':>6}  {'as they are':<24}"
                 f"{'lungs hidden':<24}lungs only")
    for name, figures in [("all", found["overall"]), *found["per_source"].items()]:
        first = figures["as_they_are"]
        lines.append(f"  {name:<16}{first['n']:>6}{first['n_positive']:>6}  "
                     f"{format_metric(first):<24}{format_metric(figures['lungs_hidden']):<24}"
                     f"{format_metric(figures['lungs_only'])}")
    lines += [f"  {warning}" for warning in found["warnings"]] or [
        f"  with the lungs hidden no group's ROC-AUC is clearly above chance (95% interval "
        f"above {found['warning_above']}): no sign of a cue outside the lungs"]
    return lines
