"""The report's figures (training history, ROC and precision-recall curves, calibration, the
score histogram), each a PNG data URI so that the page needs no other file."""

from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

import numpy as np


def png_data_uri(figure_or_rgb) -> str:
    """A matplotlib figure (closed once drawn) or an RGB array as a ``data:image/png`` URI."""
    buffer = io.BytesIO()
    if isinstance(figure_or_rgb, np.ndarray):
        from PIL import Image
        Image.fromarray(figure_or_rgb).save(buffer, format="PNG")
    else:
        import matplotlib.pyplot as plt
        figure_or_rgb.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
        plt.close(figure_or_rgb)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


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
    return png_data_uri(figure)


def plot_curves(metrics: dict) -> list[str]:
    if metrics.curves is None:
        return []
    c, point = metrics.curves, metrics.curves["operating_point"]
    roc, axes = _figure("ROC curve", "1 - specificity", "sensitivity")
    axes.plot(c["roc"]["fpr"], c["roc"]["tpr"])
    axes.plot([0, 1], [0, 1], ":", color="grey")
    axes.plot(point["fpr"], point["tpr"], "o", color="red", label="frozen threshold")
    axes.legend()
    pr, axes = _figure("Precision-recall curve", "recall (sensitivity)", "precision (PPV)")
    axes.plot(c["pr"]["recall"], c["pr"]["precision"])
    axes.plot(point["tpr"], point["precision"], "o", color="red", label="frozen threshold")
    axes.legend()
    return [png_data_uri(roc), png_data_uri(pr)]


def plot_calibration(metrics: dict) -> str:
    figure, axes = _figure(f"Reliability (ECE {metrics.calibration['ece']:.3f})",
                           "mean predicted P(COVID)", "observed COVID rate")
    bins = [b for b in metrics.calibration["bins"] if b["count"]]
    axes.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    axes.plot([b["mean_predicted"] for b in bins], [b["observed_rate"] for b in bins], "o-",
              label="model")
    axes.legend()
    return png_data_uri(figure)


def plot_histogram(metrics: dict) -> str:
    figure, axes = _figure("Scores per class", "P(COVID)", "images")
    hist = metrics.histogram
    edges = np.array(hist["edges"])
    for label, counts in hist.items():
        if label != "edges":
            axes.stairs(counts, edges, label=label)
    axes.axvline(metrics.threshold, color="red", lw=1, label="threshold")
    axes.legend()
    return png_data_uri(figure)


def plots(history_csv: Path, metrics: dict) -> list[str]:
    """Every figure the run's records allow, in the page's order."""
    return [p for p in [plot_training(history_csv), *plot_curves(metrics),
                        plot_calibration(metrics), plot_histogram(metrics)] if p]
