"""One self-contained HTML report of a run: data and audit, training, metrics with CIs, curves,
calibration, per-source results, a Grad-CAM gallery, the shortcut check and a model card.

Images are embedded as data URIs, so the file opens anywhere without the tool or a network.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from covidxray.evaluation.metrics import METRIC_NAMES
from covidxray.fileutil import write_text_atomic
from covidxray.run.metadata import RunMetadata

GALLERY_PER_KIND = 3
REPORTED_KEYS = {"overall", "per_source", "calibration", "histogram", "cases"}
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


def _png_data_uri(figure_or_rgb) -> str:
    buffer = io.BytesIO()
    if isinstance(figure_or_rgb, np.ndarray):
        from PIL import Image
        Image.fromarray(figure_or_rgb).save(buffer, format="PNG")
    else:
        import matplotlib.pyplot as plt
        figure_or_rgb.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure_or_rgb)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _figure(title: str, xlabel: str, ylabel: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    figure, axes = plt.subplots(figsize=(5, 4))
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    return figure, axes


def plot_training(history_csv: Path) -> str | None:
    rows = list(csv.DictReader(open(history_csv))) if history_csv.is_file() else []
    if not rows:
        return None
    figure, axes = _figure("Training", "epoch (both phases)", "value")
    step = np.arange(1, len(rows) + 1)
    for key, style in (("loss", "-"), ("val_loss", "--"), ("auc", "-"), ("val_auc", "--")):
        if key in rows[0]:
            axes.plot(step, [float(r[key]) for r in rows], style, label=key)
    phases = [float(r.get("phase", 1)) for r in rows]
    for i in range(1, len(phases)):
        if phases[i] != phases[i - 1]:
            axes.axvline(i + 0.5, color="grey", lw=1)
    axes.legend()
    return _png_data_uri(figure)


def plot_curves(metrics: dict) -> list[str]:
    if "curves" not in metrics:
        return []
    c, point = metrics["curves"], metrics["curves"]["operating_point"]
    roc, axes = _figure("ROC curve", "1 - specificity", "sensitivity")
    axes.plot(c["roc"]["fpr"], c["roc"]["tpr"])
    axes.plot([0, 1], [0, 1], ":", color="grey")
    axes.plot(point["fpr"], point["tpr"], "o", color="red", label="frozen threshold")
    axes.legend()
    pr, axes = _figure("Precision-recall curve", "recall (sensitivity)", "precision (PPV)")
    axes.plot(c["pr"]["recall"], c["pr"]["precision"])
    axes.plot(point["tpr"], point["precision"], "o", color="red", label="frozen threshold")
    axes.legend()
    return [_png_data_uri(roc), _png_data_uri(pr)]


def plot_calibration(metrics: dict) -> str:
    figure, axes = _figure(f"Reliability (ECE {metrics['calibration']['ece']:.3f})",
                           "mean predicted P(COVID)", "observed COVID rate")
    bins = [b for b in metrics["calibration"]["bins"] if b["count"]]
    axes.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    axes.plot([b["mean_predicted"] for b in bins], [b["observed_rate"] for b in bins], "o-",
              label="model")
    axes.legend()
    return _png_data_uri(figure)


def plot_histogram(metrics: dict) -> str:
    figure, axes = _figure("Scores per class", "P(COVID)", "images")
    hist = metrics["histogram"]
    edges = np.array(hist["edges"])
    for label, counts in hist.items():
        if label != "edges":
            axes.stairs(counts, edges, label=label)
    axes.axvline(metrics["threshold"], color="red", lw=1, label="threshold")
    axes.legend()
    return _png_data_uri(figure)


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
    if not metrics["per_source"]:
        return "<p>No source is known for these images (manifest column or " \
               "<code>--source-from-prefix</code>).</p>"
    rows = "".join(
        f"<tr><td>{html.escape(src)}</td><td>{s['n']}</td><td>{s['n_positive']}</td>"
        f"<td>{_value(s['metrics']['sensitivity']['value'])}</td>"
        f"<td>{_value(s['metrics']['specificity']['value'])}</td>"
        f"<td>{_value(s['metrics']['roc_auc']['value'])}</td></tr>"
        for src, s in metrics["per_source"].items())
    return ("<table><tr><th>source</th><th>n</th><th>positive</th><th>sensitivity</th>"
            f"<th>specificity</th><th>ROC-AUC</th></tr>{rows}</table>"
            "<p>A source with one class cannot show discrimination: a high sensitivity there "
            "may only mean the model recognises the source.</p>")


def gallery_cases(metrics: dict, per_kind: int = GALLERY_PER_KIND) -> dict[str, list[dict]]:
    """The most confident true/false positives/negatives at the frozen threshold."""
    t = metrics["threshold"]
    kinds = {"true positive": [], "false positive": [], "false negative": [],
             "true negative": []}
    for case in metrics["cases"]:
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
    from covidxray.pixels.imageio import ImageReadError
    parts = []
    for kind, cases in gallery_cases(metrics).items():
        figures = []
        for case in cases:
            try:
                explanation = explain_image(predictor, case["path"])
            except ImageReadError:
                continue
            name = Path(case["path"]).name
            figures.append(f"<figure>{_img(_png_data_uri(_thumbnail(explanation.overlay)), name)}"
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


def claim_items(meta: RunMetadata, config: dict, metrics: dict, audit: dict | None) -> list[tuple]:
    """CLAIM checklist items (Mongan et al. 2020) this run can answer from its own records."""
    sources = sorted({c["source"] for c in metrics["cases"] if c["source"]})
    grouped = "patient id where known" if config.get("split_file") is None else \
        f"the given split file {config['split_file']}"
    left_out = meta.sources_left_out
    return [
        ("Data sources", ", ".join(sources) if sources else "not recorded (no source column)"),
        ("Sources left out of training", "; ".join(f"{s}: {why}" for s, why in left_out.items())
         if left_out else "none"),
        ("Ground truth", "labels as given by the class folders / manifest; not verified by "
                         "covidxray"),
        ("Data partitions", f"train/val/test {config['split_fractions']} (seed {config['seed']}), "
                            f"stratified by class and source, grouped by {grouped}"),
        ("Partition disjointness", "no patient in more than one split (checked at training)"),
        ("Model", f"{meta.backbone} backbone, global average pooling, dropout "
                  f"{config['dropout']}, one sigmoid unit; input {meta.image_size} px"),
        ("Initialisation", f"weights: {meta.weights}"),
        ("Preprocessing", "; ".join(meta.preprocessing_steps())),
        ("Training", f"phase 1 {config['head_epochs']} epochs at {config['head_learning_rate']}, "
                     f"phase 2 {config['finetune_epochs']} epochs at "
                     f"{config['finetune_learning_rate']} ({config['unfreeze_stages']} stage(s), "
                     f"{config.get('schedule', 'constant')} schedule); "
                     f"batch {config['batch_size']}; source-cue augmentation "
                     f"{'on' if config.get('source_augment') else 'off'}; early stopping on "
                     f"validation ROC-AUC"),
        ("Test-time augmentation", f"score = mean over the image and "
                                   f"{meta.test_time_views} source-cue views"
         if meta.test_time_views else "none"),
        ("Operating point", f"threshold {meta.threshold:.4f} by {meta.threshold_method} "
                            f"on the validation split, frozen before testing"),
        ("Performance metrics", "accuracy, sensitivity, specificity, PPV, NPV, F1, ROC-AUC, "
                                "PR-AUC; 95% percentile bootstrap CIs"),
        ("Calibration", f"ECE {metrics['calibration']['ece']:.3f}"),
        ("Robustness", "per-source metrics in this report; leave-one-source-out with "
                       "'covidxray crossval --by source'"),
        ("Failure analysis", "Grad-CAM of false positives and negatives below"),
        ("Data audit", "see warnings" if audit and audit["warnings"] else
         ("no warnings" if audit else "not run")),
        ("Software", ", ".join(f"{k} {v}" for k, v in meta.versions.items())),
    ]


def audit_split(run_dir: Path, positive_class: str) -> dict:
    """The audit of a run's ``split.csv``, written beside it as ``audit.json``."""
    from covidxray.data.audit import audit
    from covidxray.data.split import read_split_records
    from covidxray.fileutil import write_json_atomic
    result = audit(read_split_records(run_dir / "split.csv", positive_class)).to_dict()
    write_json_atomic(run_dir / "audit.json", result)
    return result


def build_report(run_dir: str | Path, out: str | Path, predictor=None, metrics: dict | None = None,
                 audit: bool = True) -> Path:
    """Write the HTML report of ``run_dir`` to ``out``; evaluates the test split if the run has
    no ``metrics.json`` yet, and audits the run's split (also written to ``RUN/audit.json``)
    unless ``audit`` is False."""
    from covidxray.run.predictor import Predictor
    run_dir = Path(run_dir)
    predictor = predictor or Predictor.load(run_dir)
    meta = predictor.metadata
    config = json.loads((run_dir / "config.json").read_text())
    audit = audit_split(run_dir, meta.positive_class) if audit else None
    if metrics is None:
        metrics_file = run_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        if not REPORTED_KEYS <= set(metrics):  # none yet, or from an older version
            from covidxray.evaluation.evaluate import evaluate
            metrics = evaluate(run_dir, predictor=predictor)
    esc = html.escape
    warnings = (audit or {}).get("warnings", [])
    limitations = list(warnings)
    if meta.synthetic_data:
        limitations.insert(0, "Trained and tested on SYNTHETIC images: no statement about real "
                              "X-rays can be made.")
    overall = metrics["overall"]
    low, high = overall["metrics"]["roc_auc"]["ci95"]
    if np.isfinite(low) and high - low > 0.1:
        limitations.append(f"The test set is small: the ROC-AUC interval spans {low:.2f} to "
                           f"{high:.2f}.")
    if "shortcut" in metrics and metrics["shortcut"]["flagged"]:
        limitations.append(metrics["shortcut"]["verdict"])
    limitations.append("Tested only on data like the training data unless stated; performance "
                       "at another hospital is unknown until measured there.")
    plots = [p for p in [plot_training(run_dir / "history.csv"), *plot_curves(metrics),
                         plot_calibration(metrics), plot_histogram(metrics)] if p]
    shortcut = metrics.get("shortcut")
    counts = "".join(f"<tr><td>{s}</td><td>{esc(', '.join(f'{c}={n}' for c, n in v.items()))}"
                     f"</td></tr>" for s, v in meta.split_counts.items())
    body = f"""
<h1>covidxray report</h1>
<p>Run <code>{esc(str(run_dir))}</code> · created {esc(meta.created)} ·
{esc(meta.backbone)} at {meta.image_size} px · backend {esc(meta.backend)}</p>
<div class="notice"><strong>{esc(meta.notice)}</strong> This report describes a research
model. It must not be read as a diagnosis or used to make clinical decisions.</div>
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
<h2>Results on {esc(metrics['data'])}</h2>
<p>{overall['n']} images ({overall['n_positive']} positive) at the threshold
{metrics['threshold']:.4f}, frozen on the validation split ({esc(str(metrics['threshold_method']))}).</p>
{_metrics_table(overall)}
{_confusion(overall['confusion'], esc(meta.positive_class))}
<h3>Per source</h3>{_per_source(metrics)}
<h2>Plots</h2><div class="plots">{''.join(_img(p, 'plot') for p in plots)}</div>
<h2>Shortcut check</h2>
{f'<p class="{"warn" if shortcut["flagged"] else "ok"}">{esc(shortcut["verdict"])}</p>'
 if shortcut else '<p>not run</p>'}
<h2>Grad-CAM gallery</h2>
<p>Where the model found evidence for COVID (red = most). The most confident cases of each kind.</p>
{_gallery(predictor, metrics)}
<h2>Model card</h2>
<h3>Intended use</h3>
<p>Research on chest X-ray classification: comparing methods, studying failure modes and data
bias. <strong>Not a medical device</strong>; not for diagnosis, triage, screening or any
decision about a patient.</p>
<h3>Limitations</h3><ul>{''.join(f'<li>{esc(x)}</li>' for x in limitations)}</ul>
<h3>Checklist (CLAIM items this run can answer)</h3>
<table><tr><th>item</th><th>this run</th></tr>
{''.join(f'<tr><td>{esc(k)}</td><td style="text-align:left">{esc(v)}</td></tr>'
         for k, v in claim_items(meta, config, metrics, audit))}</table>
"""
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>covidxray report</title><style>{CSS}</style></head><body>{body}"
            f"</body></html>")
    write_text_atomic(out, page)
    return Path(out)
