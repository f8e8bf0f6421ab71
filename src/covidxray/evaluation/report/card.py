"""The report's model card: intended use, limitations, the model as the run's records describe
it (backbone, head, what was trained) and the CLAIM checklist items the run can answer."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from covidxray.run.metadata import RunMetadata

INTENDED_USE = ("<p>Research on chest X-ray classification: comparing methods, studying failure "
                "modes and data\nbias. <strong>Not a medical device</strong>; not for diagnosis, "
                "triage, screening or any\ndecision about a patient.</p>")


def _weights_words(weights: str) -> str:
    if weights.lower() == "imagenet":
        return "ImageNet weights"
    if weights.lower() == "none":
        return "random weights"
    return f"weights from {Path(weights).name}"


def _stages_words(unfreeze) -> str:
    return "every stage (stem included)" if unfreeze == "all" else \
        f"its top {unfreeze} stage{'' if unfreeze == 1 else 's'}"


def _training_words(meta: RunMetadata, config: dict) -> str:
    """Whether the backbone was fine-tuned or frozen, by the config's phases and the phase
    whose weights the run kept (``RunMetadata.selection``)."""
    weights = _weights_words(meta.weights)
    if "finetune_epochs" not in config:
        return f"{weights}; what was trained is not recorded"
    if not config["finetune_epochs"]:
        return f"frozen ({weights}): the head alone was trained"
    stages = _stages_words(config.get("unfreeze_stages", 1))
    kept = meta.selection.get("phase_kept")
    if kept == 1:
        return (f"frozen ({weights}): the head alone (the head phase's weights scored better "
                f"than the fine-tuned ones and were kept)")
    random = meta.weights.lower() == "none"
    trained = f"{stages} trained from {weights}" if random \
        else f"fine-tuned from {weights}: {stages} trained"
    if kept == 2:
        return f"{trained} with the head " \
               f"({'phase 2' if random else 'the fine-tuned'} weights were kept)"
    why = "no epoch could be scored: the last weights were kept" if meta.selection else \
        "which phase's weights were kept is not recorded"
    return f"{trained} with the head, for up to {config['finetune_epochs']} epochs ({why})"


def head_description(meta: RunMetadata, config: dict) -> str:
    """The head in words: its pooling (``pooled_stages`` of the config) and its outputs."""
    # a config written before the setting existed: the head then pooled the last stage alone
    stages = config.get("pooled_stages", 1 if config else None)
    pooling = "pooling not recorded" if stages is None else \
        "global average pooling of the last stage" if stages == 1 else \
        f"the pooled outputs of the top {stages} stages, concatenated"
    dropout = f", dropout {config['dropout']}" if "dropout" in config else ""
    positive = meta.positive_class
    outputs = f"one sigmoid unit, P({positive})" if not meta.output_classes else \
        f"a softmax over {len(meta.output_classes)} classes " \
        f"({', '.join(meta.output_classes)}), P({positive}) its {positive} output"
    return f"{pooling}{dropout}, then {outputs}"


def model_description(meta: RunMetadata, config: dict,
                      members: list[tuple[RunMetadata, dict]] | None = None) -> str:
    """The model in words, from its metadata and config: backbone, head, what was trained,
    input size; an ensemble (``meta.members``) as the mean of its members, each described
    from ``members`` (metadata and config of each, where they could be read)."""
    if meta.members:
        mean = f"the mean of its {len(meta.members)} members' P({meta.positive_class})"
        if not members:
            return f"{meta.backbone}; {mean} (the members' records were not read)"
        described = [model_description(m, c) for m, c in members]
        each = f"each: {described[0]}" if len(set(described)) == 1 else \
            "; ".join(f"member {i}: {d}" for i, d in enumerate(described, 1))
        return f"An ensemble, {mean}; {each}"
    return (f"{meta.backbone} backbone, {_training_words(meta, config)}; head: "
            f"{head_description(meta, config)}; input {meta.image_size} px")


def limitations(meta: RunMetadata, metrics: dict, audit: dict | None) -> list[str]:
    """What the reader must know before believing a number of the report."""
    found = list((audit or {}).get("warnings", []))
    if meta.synthetic_data:
        found.insert(0, "Trained and tested on SYNTHETIC images: no statement about real "
                        "X-rays can be made.")
    low, high = metrics.overall["metrics"]["roc_auc"]["ci95"]
    if np.isfinite(low) and high - low > 0.1:
        found.append(f"The test set is small: the ROC-AUC interval spans {low:.2f} to "
                     f"{high:.2f}.")
    if metrics.shortcut and metrics.shortcut["flagged"]:
        found.append(metrics.shortcut["verdict"])
    found += (metrics.lungs_hidden or {}).get("warnings", [])
    found.append("Tested only on data like the training data unless stated; performance "
                 "at another hospital is unknown until measured there.")
    return found


def claim_items(meta: RunMetadata, config: dict, metrics: dict, audit: dict | None,
                members: list[tuple[RunMetadata, dict]] | None = None) -> list[tuple]:
    """CLAIM checklist items (Mongan et al. 2020) this run can answer from its own records."""
    sources = sorted({c["source"] for c in metrics.cases if c["source"]})
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
        ("Model", model_description(meta, config, members)),
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
        ("Calibration", f"ECE {metrics.calibration['ece']:.3f}"),
        ("Robustness", "per-source metrics in this report; leave-one-source-out with "
                       "'covidxray crossval --by source'"),
        ("Failure analysis", "Grad-CAM of false positives and negatives below"),
        ("Data audit", "see warnings" if audit and audit["warnings"] else
         ("no warnings" if audit else "not run")),
        ("Software", ", ".join(f"{k} {v}" for k, v in meta.versions.items())),
    ]


def model_card(meta: RunMetadata, config: dict, metrics: dict, audit: dict | None,
               members: list[tuple[RunMetadata, dict]] | None = None) -> str:
    """The card's HTML: intended use, limitations and the checklist."""
    esc = html.escape
    listed = "".join(f"<li>{esc(x)}</li>" for x in limitations(meta, metrics, audit))
    return f"""<h2>Model card</h2>
<h3>Intended use</h3>
{INTENDED_USE}
<h3>Limitations</h3><ul>{listed}</ul>
<h3>Checklist (CLAIM items this run can answer)</h3>
<table><tr><th>item</th><th>this run</th></tr>
{''.join(f'<tr><td>{esc(k)}</td><td style="text-align:left">{esc(v)}</td></tr>'
         for k, v in claim_items(meta, config, metrics, audit, members))}</table>
"""
