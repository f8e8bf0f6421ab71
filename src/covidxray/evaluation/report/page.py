"""The report's HTML page: ``build_report`` and its sections (data, results and their tables,
model selection, image statistics, prediction sets, the heat in the lungs, the lungs hidden,
the Grad-CAM gallery); the figures come from ``plots``, the model card from ``card``."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from covidxray.config import STAND_IN_CAVEAT
from covidxray.data.statistics import AS_THEY_ARE, RUN_PIXELS
from covidxray.errors import UserError
from covidxray.evaluation.report.audit import audit_split
from covidxray.evaluation.report.card import model_card
from covidxray.evaluation.report.plots import plots, png_data_uri
from covidxray.evaluation.result import EvaluationFileError, EvaluationResult
from covidxray.fileutil import write_text_atomic
from covidxray.metrics import METRIC_NAMES
from covidxray.run.folder import RunFolder
from covidxray.run.metadata import RunMetadata

GALLERY_PER_KIND = 3
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0 auto;max-width:1100px;
padding:1.5rem;color:#1d2330;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #dde3ec;padding-bottom:.2rem;margin-top:2rem}
.notice{background:#fff4e5;border-left:6px solid #f08c00;padding:.8rem 1rem;margin:1rem 0}
.synthetic{background:#ffe3e3;border-left:6px solid #c92a2a;padding:.8rem 1rem;font-weight:600}
.warn{color:#a61e4d}.ok{color:#2b8a3e}
table{border-collapse:collapse;margin:.6rem 0}td,th{border:1px solid #dde3ec;padding:.3rem .6rem;
text-align:right}th{background:#f1f4f9}td:first-child,th:first-child{text-align:left}
.plots img{width:48%;min-width:320px;margin:.5%}
.gallery{display:flex;flex-wrap:wrap;gap:.8rem}.gallery figure{margin:0;width:200px}
.gallery img{width:200px;height:200px;object-fit:contain;background:#000}
figcaption{font-size:.8rem}
"""


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _metrics_table(summary: dict) -> str:
    rows = "".join(
        f"<tr><td>{name}</td><td>{_value(summary['metrics'][name]['value'])}</td>"
        f"<td>{_interval(summary['metrics'][name]['ci95'])}</td></tr>" for name in METRIC_NAMES)
    return f"<table><tr><th>metric</th><th>value</th><th>95% CI</th></tr>{rows}</table>"


def _value(v) -> str:
    return "n/a" if v is None or not np.isfinite(v) else f"{v:.3f}"


def _interval(ci) -> str:
    return "n/a" if not np.all(np.isfinite(ci)) else f"{ci[0]:.3f} – {ci[1]:.3f}"


def _confusion(c: dict, positive: str) -> str:
    return (f"<table><tr><th></th><th>predicted {positive}</th><th>predicted not</th></tr>"
            f"<tr><td>actual {positive}</td><td>{c['tp']} (TP)</td><td>{c['fn']} (FN)</td></tr>"
            f"<tr><td>actual not</td><td>{c['fp']} (FP)</td><td>{c['tn']} (TN)</td></tr></table>")


def _per_source(metrics: dict) -> str:
    if not metrics.per_source:
        return "<p>No source is known for these images (manifest column or " \
               "<code>--source-from-prefix</code>).</p>"
    rows = "".join(
        f"<tr><td>{html.escape(src)}</td><td>{s['n']}</td><td>{s['n_positive']}</td>"
        f"<td>{_value(s['metrics']['sensitivity']['value'])}</td>"
        f"<td>{_value(s['metrics']['specificity']['value'])}</td>"
        f"<td>{_value(s['metrics']['roc_auc']['value'])}</td></tr>"
        for src, s in metrics.per_source.items())
    return ("<table><tr><th>source</th><th>n</th><th>positive</th><th>sensitivity</th>"
            f"<th>specificity</th><th>ROC-AUC</th></tr>{rows}</table>"
            "<p>A source with one class cannot show discrimination: a high sensitivity there "
            "may only mean the model recognises the source.</p>")


def _classes(metrics: dict) -> str:
    table = metrics.classes
    if not table:
        return ""
    names = table["classes"]
    head = "".join(f"<th>called {html.escape(n)}</th>" for n in names)
    rows = "".join(f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{v}</td>" for v in row)
                   + f"<td>{_value(table['per_class'][n]['recall'])}</td>"
                   f"<td>{_value(table['per_class'][n]['precision'])}</td></tr>"
                   for n, row in zip(names, table["confusion"]))
    return (f"<h3>{len(names)} classes</h3><p>The most probable class against each film's own "
            f"(accuracy {_value(table['accuracy'])}).</p><table><tr><th>actual</th>{head}"
            f"<th>recall</th><th>precision</th></tr>{rows}</table>")


def _contrasts(metrics: dict) -> str:
    found = metrics.contrasts or {}
    if not found:
        return ("<p>The labels name no other class with enough images (10 of each) to score "
                "the positive class against it.</p>")
    rows = "".join(f"<tr><td>{'all views' if group == 'all' else html.escape(group) + ' only'}"
                   f"</td><td>{html.escape(name)}</td><td>{v['n_positive']} vs "
                   f"{v['n'] - v['n_positive']}</td><td>{_value(v['value'])}</td>"
                   f"<td>{_interval(v['ci95'])}</td></tr>"
                   for group, values in found.items() for name, v in values.items())
    return ("<table><tr><th>films</th><th>contrast</th><th>images</th><th>ROC-AUC</th>"
            f"<th>95% CI</th></tr>{rows}</table><p>COVID against another pneumonia is the "
            "question a clinician asks; against films with no finding it is an easier one. A "
            "score that holds for all views and falls within one view was partly the view's "
            "(AP films are mostly COVID in public collections).</p>")


def _selection(meta: RunMetadata) -> str:
    """Which phase's weights the run kept, on which data and evidence."""
    kept = meta.selection
    if not kept:
        return "<p>Not recorded (a run from an older version).</p>"
    if meta.members:
        return f"<p>An ensemble of {len(meta.members)}: {html.escape(kept['evidence'])}.</p>"
    scores = ", ".join(f"{name} {value:.3f}" for name, value in
                       kept.get("per_phase_roc_auc", {}).items())
    return (f"<p>Kept: the weights of phase {kept['phase_kept']} "
            f"({html.escape(kept['phase_name'])}), epoch {kept['epoch']}, chosen by ROC-AUC on "
            f"{html.escape(kept['selected_on'])} "
            f"(best per phase: {html.escape(scores)}). {html.escape(kept['evidence'])}.</p>"
            "<p>Selecting on the training collection's own validation split rewards what that "
            "collection shares, which a new hospital does not. Labelled films of another source "
            "(<code>--select-on</code>) make a better judge.</p>")


def _image_statistics(meta: RunMetadata) -> str:
    """How well image statistics alone separate each training source's classes."""
    found = meta.image_statistics
    if not found:
        return "<p>No training source has enough images of both classes to measure it.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(source)}</td><td>{r['images']}</td>"
        f"<td>{r['options'][AS_THEY_ARE]['thumbnail']:.2f}</td>"
        f"<td>{r['options'][AS_THEY_ARE]['histogram']:.2f}</td>"
        f"<td>{r['options'][RUN_PIXELS]['thumbnail']:.2f}</td>"
        f"<td>{r['options'][RUN_PIXELS]['histogram']:.2f}</td>"
        f"<td>{r['size_and_aspect']:.2f}</td></tr>" for source, r in found.items())
    return ("<table><tr><th>source</th><th>images</th><th>thumbnail, as the files are</th>"
            "<th>histogram, as the files are</th><th>thumbnail, as this run prepares them</th>"
            "<th>histogram, as prepared</th><th>size and aspect</th></tr>" + rows + "</table>"
            "<p>Cross-validated ROC-AUC of a logistic regression on 16x16 thumbnails, on the "
            "grey-level histogram and on the files' size and aspect, within each training source"
            " (0.5: they tell nothing). What they give away, a network can learn instead of the "
            "disease; <code>covidxray audit</code> tries every pixel option.</p>")


def _prediction_sets(metrics: dict) -> str:
    sets = metrics.prediction_sets
    if not sets:
        return "<p>This run has no prediction sets (a run from an older version).</p>"
    rows = "".join(f"<tr><td>{html.escape(scope)}</td><td>{html.escape(name)}</td><td>{c['n']}</td>"
                   f"<td>{c['coverage']:.1%}</td><td>{c['uncertain']:.1%}</td>"
                   f"<td>{c['unlike']:.1%}</td></tr>"
                   for scope, per_class in [("all", sets["per_class"]),
                                            *sets["per_source"].items()]
                   for name, c in per_class.items())
    examples = {kind: [Path(c["path"]).name for c in metrics.cases
                       if c.get("prediction_set") is not None and test(c["prediction_set"])][:8]
                for kind, test in (("uncertain: refer", lambda s: len(s) == 2),
                                   ("unlike the calibration data", lambda s: len(s) == 0))}
    drift = metrics.drift
    drift_text = f"<p>{html.escape(drift['verdict'])}.</p>" if drift else ""
    return drift_text + (
            f"<p>Each film gets the set of classes that conformal prediction (Mondrian by "
            f"class, calibrated on {' and '.join(map(str, sets['calibration_images']))} "
            f"validation films) cannot rule out at {sets['confidence']:.0%} confidence: one "
            f"class, both (<strong>uncertain: refer</strong>) or none (<strong>unlike the "
            f"calibration data</strong>). The promise, each class covered at least "
            f"{sets['confidence']:.0%} of the time, holds for films like the validation films "
            f"only; here is how it held on these films: uncertain "
            f"{sets['uncertain_rate']:.1%}, unlike {sets['unlike_rate']:.1%}.</p>"
            "<table><tr><th>films</th><th>class</th><th>n</th><th>coverage</th>"
            f"<th>uncertain</th><th>unlike</th></tr>{rows}</table>"
            + "".join(f"<p>{html.escape(kind)}: {html.escape(', '.join(names) or 'none')}"
                      f"</p>" for kind, names in examples.items()))


def _lungs(metrics: dict, predictor) -> str:
    lungs = metrics.lungs or {}
    if not lungs.get("segmenter"):
        return "<p>Not measured: no lung segmenter was installed.</p>"
    card = predictor.segmenter.card
    heldout = "; ".join(f"{k}: Dice {v['dice_median']:.3f} (median)"
                        for k, v in card.heldout.items())
    if lungs.get("heat_in_lungs") is None:
        found = "<p>No plausible lungs were found on any image.</p>"
    else:
        rows = "".join(f"<tr><td>{html.escape(name)}</td><td>{share:.0%}</td></tr>" for name, share
                       in {**lungs["per_class"], **lungs["per_source"]}.items())
        found = (f"<p>{lungs['heat_in_lungs']:.0%} of the Grad-CAM heat lies inside the lungs "
                 f"found on {lungs['lungs_found']} of {lungs['images']} images; an even spread "
                 f"would put {lungs['lung_area_share']:.0%} there (their share of the image).</p>"
                 f"<table><tr><th>class or source</th><th>heat in the lungs</th></tr>{rows}"
                 "</table>")
    return found + (f"<p>Lungs found by the segmenter {html.escape(card.name)} (held out by "
                    f"patient: {html.escape(heldout)}; never shown: "
                    f"{html.escape('; '.join(card.not_shown))}).</p>")


def _lungs_hidden(metrics: dict) -> str:
    found = metrics.lungs_hidden
    if not found:
        return "<p>Not run (no lung segmenter).</p>"
    intro = (f"<p>The same films scored twice more (Maguolo and Nanni, 2021): with their lungs "
             f"(grown by a few pixels) filled with the film's mean grey level, and with "
             f"everything but their lungs filled. A model that reads the disease should fall "
             f"to chance with the lungs hidden. {found['films_with_lungs']} of "
             f"{found['films']} films had plausible lungs.</p>")
    if found["overall"] is None:
        return intro + "<p>Not scored: those films hold one class only.</p>"
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{f['as_they_are']['n']}</td>"
        + "".join(f"<td>{_value(f[k]['value'])} ({_interval(f[k]['ci95'])})</td>"
                  for k in ("as_they_are", "lungs_hidden", "lungs_only")) + "</tr>"
        for name, f in [("all", found["overall"]), *found["per_source"].items()])
    warnings = "".join(f'<p class="warn">{html.escape(w)}</p>' for w in found["warnings"]) or \
        '<p class="ok">With the lungs hidden no group is clearly above chance.</p>'
    return (intro + "<table><tr><th>films</th><th>n</th><th>ROC-AUC as they are</th>"
            "<th>lungs hidden</th><th>lungs only</th></tr>" + rows + "</table>" + warnings)


def gallery_cases(cases: list[dict], threshold: float,
                  per_kind: int = GALLERY_PER_KIND) -> dict[str, list[dict]]:
    """The most confident true/false positives/negatives at the frozen threshold, of an
    evaluation's ``cases``."""
    t = threshold
    kinds = {"true positive": [], "false positive": [], "false negative": [],
             "true negative": []}
    for case in cases:
        called = case["score"] >= t
        kind = f"{'true' if called == bool(case['target']) else 'false'} " \
               f"{'positive' if called else 'negative'}"
        kinds[kind].append(case)
    for kind, cases in kinds.items():
        cases.sort(key=lambda c: -abs(c["score"] - t))
        kinds[kind] = cases[:per_kind]
    return kinds


def _gallery(predictor, metrics: dict) -> str:
    from covidxray.evaluation.explain import explain_image
    from covidxray.pixels.decode import ImageReadError
    parts = []
    for kind, cases in gallery_cases(metrics.cases, metrics.threshold).items():
        figures = []
        for case in cases:
            try:
                explanation = explain_image(predictor, case["path"])
            except ImageReadError:
                continue
            name = Path(case["path"]).name
            figures.append(f"<figure>{_img(png_data_uri(_thumbnail(explanation.overlay)), name)}"
                           f"<figcaption>{html.escape(name)}<br>P={case['score']:.3f} · "
                           f"{html.escape(case['label'])}</figcaption></figure>")
        parts.append(f"<h3>{kind} ({len(figures)})</h3><div class='gallery'>"
                     + ("".join(figures) or "<p>none</p>") + "</div>")
    return "".join(parts)


def _thumbnail(rgb: np.ndarray, size: int = 320) -> np.ndarray:
    from PIL import Image
    image = Image.fromarray(rgb)
    image.thumbnail((size, size))
    return np.asarray(image)


def _members(folder: RunFolder, meta: RunMetadata) -> list[tuple[RunMetadata, dict]] | None:
    """An ensemble's members, the metadata and config of each, for the model card (None: not
    an ensemble, or a member whose records cannot be read)."""
    if not meta.members:
        return None
    try:
        return [(member.metadata(), json.loads(member.config_file.read_text())
                 if member.config_file.is_file() else {})
                for member in folder.member_folders(meta)]
    except (UserError, OSError, ValueError):
        return None  # the card then names the members without describing them


def saved_evaluation(folder: RunFolder) -> EvaluationResult | None:
    """The run's ``metrics.json`` (None where there is none, or one this version cannot
    read)."""
    values = folder.read_metrics()
    try:
        return None if values is None else EvaluationResult.from_dict(values,
                                                                      str(folder.metrics_file))
    except EvaluationFileError:
        return None


def build_report(run_dir: str | Path, out: str | Path, predictor=None, metrics: dict | None = None,
                 audit: bool = True) -> Path:
    """Write the HTML report of ``run_dir`` to ``out``; evaluates the test split if the run has
    no ``metrics.json`` yet, and audits the run's split (also written to ``RUN/audit.json``)
    unless ``audit`` is False."""
    from covidxray.run.predictor import Predictor
    run_dir = Path(run_dir)
    predictor = predictor or Predictor.load(run_dir)
    meta = predictor.metadata
    folder = RunFolder(run_dir)
    # an ensemble built from runs: its first member's config
    config_file = folder.config_file if folder.config_file.is_file() else \
        folder.member_folders(meta)[0].config_file
    config = json.loads(config_file.read_text())
    audit = audit_split(run_dir, meta.positive_class) if audit else None
    if metrics is None:
        metrics = saved_evaluation(folder)
        if metrics is None:  # none yet, or one this version cannot read: measured now
            from covidxray.evaluation.evaluate import evaluate
            metrics = evaluate(run_dir, predictor=predictor)
    esc = html.escape
    warnings = (audit or {}).get("warnings", [])
    overall = metrics.overall
    method = esc(str(metrics.threshold_method))
    figures = plots(folder.history_file, metrics)
    shortcut = metrics.shortcut
    counts = "".join(f"<tr><td>{s}</td><td>{esc(', '.join(f'{c}={n}' for c, n in v.items()))}"
                     f"</td></tr>" for s, v in meta.split_counts.items())
    body = f"""
<h1>covidxray report</h1>
<p>Run <code>{esc(str(run_dir))}</code> · created {esc(meta.created)} ·
{esc(meta.backbone)} at {meta.image_size} px · backend {esc(meta.backend)}</p>
<div class="notice"><strong>{esc(meta.notice)}</strong> This report describes a research
model. It must not be read as a diagnosis or used to make clinical decisions.
{esc(STAND_IN_CAVEAT)}</div>
{'<div class="synthetic">SYNTHETIC DATA: this run was trained on synthetic images.</div>'
 if meta.synthetic_data else ''}
<h2>Data</h2>
<table><tr><th>split</th><th>images per class</th></tr>{counts}</table>
<p>Positive class: <strong>{esc(meta.positive_class)}</strong>; negative:
{esc(', '.join(meta.negative_classes))}. Training data fingerprint
<code>{meta.data_fingerprint[:16]}…</code>.</p>
<h3>Audit warnings</h3>
{'<ul>' + ''.join(f'<li class="warn">{esc(w)}</li>' for w in warnings) + '</ul>'
 if warnings else ('<p class="ok">none</p>' if audit else '<p>audit not run</p>')}
<h2>Results on {esc(metrics.data)}</h2>
<p>{overall['n']} images ({overall['n_positive']} positive) at the threshold
{metrics.threshold:.4f}, frozen on the validation split ({method}).</p>
{_metrics_table(overall)}
{_confusion(overall['confusion'], esc(meta.positive_class))}
<h3>Per source</h3>{_per_source(metrics)}
{_classes(metrics)}
<h3>By original class and view</h3>{_contrasts(metrics)}
<h3>Model selection</h3>{_selection(meta)}
<h3>Image statistics of the training sources</h3>{_image_statistics(meta)}
<h2>When the model does not know</h2>{_prediction_sets(metrics)}
<h2>Plots</h2><div class="plots">{''.join(_img(p, 'plot') for p in figures)}</div>
<h2>Shortcut check</h2>
{f'<p class="{"warn" if shortcut["flagged"] else "ok"}">{esc(shortcut["verdict"])}</p>'
 if shortcut else '<p>not run</p>'}
<h2>Heat in the lungs</h2>
{_lungs(metrics, predictor)}
<h2>Lungs hidden</h2>{_lungs_hidden(metrics)}
<h2>Grad-CAM gallery</h2>
<p>Where the model found evidence for COVID (red = most). The most confident cases of each kind.</p>
{_gallery(predictor, metrics)}
{model_card(meta, config, metrics, audit, _members(folder, meta))}"""
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>covidxray report</title><style>{CSS}</style></head><body>{body}"
            f"</body></html>")
    write_text_atomic(out, page)
    return Path(out)
