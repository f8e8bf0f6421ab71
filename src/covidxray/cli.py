"""The ``covidxray`` command: argument parsing only; every command calls the Python API.

Exit status: 0 success, 1 the job failed (or, for predict, some files could not be read),
2 usage errors.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import sys
from pathlib import Path

from covidxray import __version__
from covidxray.data.audit import DEFAULT_NEAR_DISTANCE

NOTICE = "covidxray is for research only. It is not a medical device and gives no diagnosis."
log = logging.getLogger("covidxray")


def _stages(value: str) -> int | str:
    """--unfreeze-stages: a positive number, or 'all'."""
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {value!r}") from None


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    from covidxray.config import INTENSITY_MODES, SCHEDULES, AugmentConfig, TrainConfig
    from covidxray.model.network import BACKBONES
    d = TrainConfig(data="", out="")
    a = AugmentConfig()
    model = parser.add_argument_group("model")
    model.add_argument("--image-size", type=int, default=d.image_size,
                       help="square input size in pixels (default %(default)s)")
    model.add_argument("--backbone", default=d.backbone,
                       help="backbone: " + ", ".join(BACKBONES)
                            + " (default %(default)s; docs/benchmarks.md compares them)")
    model.add_argument("--weights", default=d.weights,
                       help="'imagenet' (downloaded by Keras, or taken from its cache), 'none' "
                            "(random), or the path of a weights file (default %(default)s)")
    model.add_argument("--intensity", choices=INTENSITY_MODES, default=d.intensity,
                       help="grey-level normalisation of every image, in training and use "
                            "(default %(default)s)")
    model.add_argument("--crop", type=float, default=d.crop,
                       help="fraction of each side cut off every image before resizing, away "
                            "from text and markers (default %(default)s)")
    model.add_argument("--dropout", type=float, default=d.dropout)
    model.add_argument("--mixed-precision", choices=("auto", "on", "off"),
                       default=d.mixed_precision,
                       help="bfloat16 compute: auto = on a GPU only (default %(default)s)")
    fit = parser.add_argument_group("training")
    fit.add_argument("--batch-size", type=int, default=d.batch_size)
    fit.add_argument("--head-epochs", type=int,
                     help="phase 1, frozen backbone; 0 skips it (default: 10 with pretrained "
                          "weights, 0 with --weights none)")
    fit.add_argument("--head-lr", type=float, help="phase 1 learning rate (default 1e-3)")
    fit.add_argument("--finetune-epochs", type=int,
                     help="phase 2, top stage(s) unfrozen; 0 skips it (default: 5 with "
                          "pretrained weights, 15 with --weights none)")
    fit.add_argument("--finetune-lr", type=float,
                     help="phase 2 learning rate (default: 1e-5 pretrained, 1e-3 from scratch)")
    fit.add_argument("--unfreeze-stages", type=_stages,
                     help="backbone stages trained in phase 2, from the top, or 'all' "
                          "(default: 1 pretrained, all from scratch)")
    fit.add_argument("--no-cached-head", action="store_true",
                     help="phase 1 runs the frozen backbone every epoch instead of training "
                          "the head on features computed once")
    fit.add_argument("--no-cached-trunk", action="store_true",
                     help="phase 2 of a pretrained backbone runs the whole network every epoch "
                          "(with Keras' augmentation layers) instead of training the top stages "
                          "on the frozen trunk's output computed once per image and view")
    fit.add_argument("--head-views", type=int, default=d.head_views,
                     help="augmented views per image whose features phase 1 also trains on "
                          "(default %(default)s)")
    fit.add_argument("--feature-cache", metavar="DIR",
                     help="keep backbone features here for later runs on the same data")
    fit.add_argument("--stream", action="store_true",
                     help="read training batches from the files in worker threads while "
                          "training, instead of from images held in memory")
    fit.add_argument("--image-cache", metavar="DIR",
                     help="with --stream: keep decoded, resized images here for later epochs")
    fit.add_argument("--workers", type=int, default=d.workers,
                     help="with --stream: decoding threads (default %(default)s)")
    fit.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                     help="learning rate within each phase: constant (default), or a warm-up "
                          "over the first tenth of the steps and a cosine decay to zero")
    fit.add_argument("--patience", type=int, default=d.patience,
                     help="epochs without a better validation ROC-AUC before stopping")
    fit.add_argument("--no-class-weights", action="store_true",
                     help="do not weight the loss by inverse class frequency")
    fit.add_argument("--source-balance", action="store_true",
                     help="weigh each source's classes equally within the source, then the "
                          "classes overall")
    fit.add_argument("--no-augment", action="store_true", help="no random augmentation")
    fit.add_argument("--rotation", type=float, default=a.rotation_degrees,
                     help="max rotation in degrees (default %(default)s)")
    fit.add_argument("--zoom", type=float, default=a.zoom)
    fit.add_argument("--translation", type=float, default=a.translation)
    fit.add_argument("--brightness", type=float, default=a.brightness)
    fit.add_argument("--contrast", type=float, default=a.contrast)
    fit.add_argument("--source-augment", action=argparse.BooleanOptionalAction,
                     default=d.source_augment,
                     help="also randomise gamma, blur, noise, JPEG quality, borders and crops "
                          "(phase 2): cues that tell sources apart (default: on)")
    fit.add_argument("--test-time-views", type=int, default=d.test_time_views, metavar="K",
                     help="score every image as the mean over it and K seeded source-cue "
                          "views (test-time augmentation; K+1 forward passes per image; "
                          "default %(default)s, 0: the image alone)")
    fit.add_argument("--horizontal-flip", action="store_true",
                     help="also flip left-right (off by default: anatomy is not symmetric)")
    split = parser.add_argument_group("data and split")
    split.add_argument("--positive-class",
                       help="class folder/label that is COVID (default: the one named *covid*)")
    split.add_argument("--split", dest="split_file", metavar="SPLIT_CSV",
                       help="reuse the split of an earlier run (its split.csv)")
    split.add_argument("--val-fraction", type=float, default=d.split_fractions[1])
    split.add_argument("--test-fraction", type=float, default=d.split_fractions[2])
    split.add_argument("--seed", type=int, default=d.seed)
    split.add_argument("--source-from-prefix", action="store_true",
                       help="take each image's source from its file name before the first '_'")
    split.add_argument("--sources", nargs="+", metavar="SOURCE",
                       help="train (and validate, test) on these sources only")
    split.add_argument("--exclude-sources", nargs="+", metavar="SOURCE", default=(),
                       help="leave these sources out")
    split.add_argument("--exclude-confounded", action="store_true",
                       help="leave out the sources the audit flags as confounded: one class "
                            "only, or a COVID share far from the other sources' (they teach "
                            "the source, not the disease)")
    split.add_argument("--strict", action="store_true",
                       help="stop at the first unreadable file instead of skipping it")
    split.add_argument("--allow-leaks", action="store_true",
                       help="train even when identical files sit in different splits")
    threshold = parser.add_argument_group("operating threshold (chosen on validation)")
    threshold.add_argument("--calibrate", action="store_true",
                           help="fit temperature scaling on validation; scores are rescaled")
    threshold.add_argument("--target-sensitivity", type=float, default=None,
                           help="highest threshold reaching this sensitivity, e.g. 0.95 "
                                "(default: maximise Youden's J)")


def _train_config(args):
    from covidxray.config import AugmentConfig, TrainConfig
    augment = AugmentConfig(0, 0, 0, 0, 0, False) if args.no_augment else AugmentConfig(
        args.rotation, args.zoom, args.translation, args.brightness, args.contrast,
        args.horizontal_flip)
    return TrainConfig(
        data=str(args.data), out=str(args.out), image_size=args.image_size,
        intensity=args.intensity, crop=args.crop,
        backbone=args.backbone, weights=args.weights, dropout=args.dropout,
        batch_size=args.batch_size, head_epochs=args.head_epochs,
        head_learning_rate=args.head_lr, finetune_epochs=args.finetune_epochs,
        finetune_learning_rate=args.finetune_lr, unfreeze_stages=args.unfreeze_stages,
        patience=args.patience, schedule=args.schedule, cached_head=not args.no_cached_head,
        cached_trunk=not args.no_cached_trunk,
        source_augment=args.source_augment, test_time_views=args.test_time_views,
        head_views=args.head_views, feature_cache=args.feature_cache, stream=args.stream,
        image_cache=args.image_cache, workers=args.workers,
        mixed_precision=args.mixed_precision,
        class_weights=not args.no_class_weights, source_balance=args.source_balance,
        augment=augment,
        split_fractions=(1 - args.val_fraction - args.test_fraction, args.val_fraction,
                         args.test_fraction),
        split_file=args.split_file, seed=args.seed, positive_class=args.positive_class,
        threshold_method="sensitivity" if args.target_sensitivity else "youden",
        target_sensitivity=args.target_sensitivity or 0.95, calibrate=args.calibrate,
        source_from_prefix=args.source_from_prefix, sources=args.sources,
        exclude_sources=args.exclude_sources, exclude_confounded=args.exclude_confounded,
        strict=args.strict, allow_leaks=args.allow_leaks)


def cmd_train(args) -> int:
    from covidxray.training.fit import train
    if args.resume:
        from covidxray.config import TrainConfig
        config = TrainConfig.load(Path(args.out) / "config.json")
    else:
        if args.data is None:
            raise UsageError("train needs DATA (or --resume with --out of an interrupted run)")
        config = _train_config(args)
    run = train(config, resume=args.resume, verbose=_verbosity(args.quiet))
    from covidxray.run.metadata import METADATA_FILE, RunMetadata
    meta = RunMetadata.load(run / METADATA_FILE)
    print(f"run written to {run}")
    print(f"validation ROC-AUC {meta.validation_metrics['roc_auc']:.3f}; threshold "
          f"{meta.threshold:.4f} frozen ({meta.threshold_method})")
    print(f"next: covidxray evaluate {run}")
    return 0


def cmd_evaluate(args) -> int:
    from covidxray.evaluation.evaluate import evaluate, format_report
    result = evaluate(args.run, args.data, n_bootstrap=args.bootstrap,
                      source_from_prefix=args.source_from_prefix, out=args.out,
                      seed=args.seed, strict=args.strict, shortcut_images=args.shortcut_images)
    print(format_report(result))
    print(f"\nmetrics written to {args.out or Path(args.run) / 'metrics.json'}")
    return 0


def cmd_audit(args) -> int:
    from covidxray.data.audit import audit, format_audit
    from covidxray.data.dataset import discover, with_splits
    from covidxray.data.split import read_split_csv
    from covidxray.fileutil import write_json_atomic
    dataset = discover(args.data, args.positive_class, args.source_from_prefix)
    records = dataset.records
    if args.split_file:
        records = with_splits(records, read_split_csv(args.split_file))
    result = audit(records, None if args.no_near else args.near_distance)
    write_json_atomic(args.out, {"data": str(args.data), **result.to_dict()})
    print(format_audit(result))
    print(f"\naudit written to {args.out}")
    return 1 if args.fail_on_leak and result.leak else 0


def _write_heatmaps(predictor, paths, out, alpha: float = 0.4, stream=sys.stdout) -> int:
    """Grad-CAM overlays of ``paths`` into ``out``; returns how many files failed."""
    from covidxray.evaluation.explain import explain_image, save_png
    from covidxray.pixels.imageio import ImageReadError
    failed = 0
    for path in paths:
        try:
            explanation = explain_image(predictor, path, alpha)
        except ImageReadError as error:
            print(f"error: {error.path}: {error.reason}", file=sys.stderr)
            failed += 1
            continue
        target = Path(out) / f"{Path(path).stem}_gradcam.png"
        save_png(target, explanation.overlay)
        print(f"{target}  P(COVID)={explanation.probability:.4f}  {explanation.label}",
              file=stream)
    return failed


def cmd_explain(args) -> int:
    from covidxray.run.predictor import Predictor, collect_paths
    predictor = Predictor.load(args.run)
    paths = collect_paths(args.images)
    if not paths:
        raise UsageError(f"no image files found in {' '.join(args.images)}")
    return 1 if _write_heatmaps(predictor, paths, args.out, args.alpha) else 0


def cmd_report(args) -> int:
    from covidxray.data.audit import audit
    from covidxray.data.split import read_split_records
    from covidxray.evaluation.report import build_report
    from covidxray.fileutil import write_json_atomic
    from covidxray.run.predictor import Predictor
    predictor = Predictor.load(args.run)
    audit_result = None
    if not args.no_audit:
        records = read_split_records(Path(args.run) / "split.csv",
                                     predictor.positive_class)
        audit_result = audit(records).to_dict()
        write_json_atomic(Path(args.run) / "audit.json", audit_result)
    out = build_report(args.run, args.out, predictor=predictor, audit=audit_result)
    print(f"report written to {out}")
    return 0


def cmd_crossval(args) -> int:
    from covidxray.evaluation.crossval import crossval, format_crossval
    config = _train_config(args)
    result = crossval(args.data, args.out, config, by=args.by,
                      random_split=not args.no_random_split, n_bootstrap=args.bootstrap,
                      train_models=not args.baseline_only, resume=args.resume)
    print(format_crossval(result))
    print(f"\nresults written to {Path(args.out) / 'crossval.json'} and crossval.csv")
    return 0


def cmd_serve(args) -> int:
    import uvicorn

    from covidxray.deploy.serve.app import create_app
    app = create_app(args.run, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                     max_pixels=args.max_pixels)
    print(f"{NOTICE}\nserving {args.run} on http://{args.host}:{args.port}/ "
          f"(API docs at /docs)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


def cmd_predict(args) -> int:
    from covidxray.run.predictor import Predictor, collect_paths
    predictor = Predictor.load(args.run)
    paths = collect_paths(args.paths)
    if not paths:
        raise UsageError(f"no image files found in {' '.join(args.paths)}")
    results = predictor.predict_paths(paths, batch_size=args.batch_size)
    synthetic = predictor.metadata.synthetic_data
    if args.csv:
        _write_predictions_csv(args.csv, results, synthetic)
    if args.json:
        print(json.dumps({"notice": predictor.metadata.notice, "synthetic_data": synthetic,
                          "threshold": predictor.threshold,
                          "predictions": [r.to_dict() for r in results]}, indent=2))
    else:
        print(_predictions_table(results, predictor.threshold, synthetic))
    if args.explain:
        # stdout may carry --json: the list of heat maps goes to stderr
        _write_heatmaps(predictor, [r.path for r in results if not r.error], args.explain,
                        stream=sys.stderr)
    failed = [r for r in results if r.error]
    for r in failed:
        print(f"error: {r.path}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def _predictions_table(results, threshold: float, synthetic: bool) -> str:
    lines = [NOTICE]
    if synthetic:
        lines.append("*** model trained on SYNTHETIC data: outputs mean nothing clinically ***")
    width = max(len(r.path) for r in results)
    lines.append(f"{'file':<{width}}  P(COVID)  label (threshold {threshold:.4f})")
    for r in results:
        if r.error:
            lines.append(f"{r.path:<{width}}  {'-':>8}  ERROR: {r.error}")
        else:
            warning = f"  OUT OF DISTRIBUTION: {r.ood_reason}" if r.ood else ""
            lines.append(f"{r.path:<{width}}  {r.probability:8.4f}  {r.label}{warning}")
    if any(r.ood for r in results):
        lines.append("Out-of-distribution images: their probability is shown but means nothing.")
    return "\n".join(lines)


def _write_predictions_csv(path, results, synthetic: bool) -> None:
    from covidxray.fileutil import write_text_atomic
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "probability", "label", "positive", "ood", "ood_reason", "error",
                     "synthetic_data"])
    for r in results:
        writer.writerow([r.path, "" if r.probability is None else f"{r.probability:.6f}",
                         r.label or "", "" if r.positive is None else int(r.positive),
                         "" if r.ood is None else int(r.ood), r.ood_reason or "",
                         r.error or "", int(synthetic)])
    write_text_atomic(path, buffer.getvalue())


def cmd_demo(args) -> int:
    """data (synthetic unless given) -> train -> evaluate -> predict, all under --out."""
    from covidxray.data.synthetic import make_synthetic_dataset
    from covidxray.evaluation.evaluate import evaluate, format_report
    from covidxray.run.predictor import Predictor, collect_paths
    from covidxray.training.fit import train
    out = Path(args.out)
    if (out / "run" / "config.json").exists():
        raise UsageError(f"{out} already holds a demo; remove it or pass another --out")
    data = Path(args.data) if args.data else make_synthetic_dataset(
        out / "data", n_per_class=args.n_per_class, size=2 * args.image_size, seed=args.seed)
    print(f"== 1/4 data: {data}" + ("" if args.data else " (SYNTHETIC radiograph-like images)"))
    config = _train_config(build_parser().parse_args([
        "train", str(data), "--out", str(out / "run"), "--image-size", str(args.image_size),
        "--weights", "none", "--finetune-epochs", str(args.epochs), "--batch-size", "16",
        "--patience", str(args.epochs), "--seed", str(args.seed)]))
    print("== 2/4 train: ResNet50 from random weights (no download needed)")
    run = train(config, verbose=_verbosity(args.quiet))
    print("== 3/4 evaluate on the held-out test split")
    print(format_report(evaluate(run, n_bootstrap=500, seed=args.seed)))
    print("== 4/4 predict: a few test images")
    test_paths = [line.split(",")[0] for line in (run / "split.csv").read_text().splitlines()
                  if ",test," in line][:6]
    predictor = Predictor.load(run)
    results = predictor.predict_paths(collect_paths(test_paths))
    print(_predictions_table(results, predictor.threshold,
                             predictor.metadata.synthetic_data))
    print(f"\neverything is in {out}: run/model.keras, run/metadata.json, run/metrics.json, "
          f"run/history.csv, run/split.csv")
    return 0


def _verbosity(quiet: bool) -> int:
    """Keras progress: none when quiet, bars on a terminal, one line per epoch in a log."""
    return 0 if quiet else (1 if sys.stdout.isatty() else 2)


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidxray", description=f"COVID-19 vs non-COVID chest X-ray classifier "
                                      f"(Keras ResNet50). {NOTICE}")
    parser.add_argument("--version", action="version", version=f"covidxray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("train", help="train a model and write a run folder")
    p.add_argument("data", nargs="?", help="class folders, split folders, or a CSV manifest")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("evaluate", help="metrics with 95%% CIs at the frozen threshold")
    p.add_argument("run")
    p.add_argument("data", nargs="?", help="labelled data (default: the run's test split)")
    p.add_argument("--out", help="metrics file (default RUN/metrics.json)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    p.add_argument("--shortcut-images", type=int, default=200,
                   help="images for the border-shortcut check (0 skips it)")
    p.add_argument("--source-from-prefix", action="store_true",
                   help="source = file name before the first '_' (per-source metrics)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--strict", action="store_true", help="stop at the first unreadable file")
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("audit", help="duplicates, leaks, label conflicts, source x class")
    p.add_argument("data", help="class folders, split folders, or a CSV manifest")
    p.add_argument("--split", dest="split_file", metavar="SPLIT_CSV",
                   help="audit the split of a run (its split.csv)")
    p.add_argument("--out", default="audit.json", help="JSON file (default %(default)s)")
    p.add_argument("--near-distance", type=int, default=DEFAULT_NEAR_DISTANCE,
                   help="near duplicate: difference-hash distance <= this, of 256 bits "
                        "(default %(default)s)")
    p.add_argument("--no-near", action="store_true", help="skip the near-duplicate search")
    p.add_argument("--fail-on-leak", action="store_true",
                   help="exit 1 when duplicates or patients cross splits")
    p.add_argument("--positive-class")
    p.add_argument("--source-from-prefix", action="store_true",
                   help="source = file name before the first '_'")
    p.set_defaults(func=cmd_audit)

    p = commands.add_parser("crossval", help="leave-one-source-out training and testing")
    p.add_argument("data", help="class folders, split folders, or a CSV manifest")
    p.add_argument("--by", default="source", choices=["source"],
                   help="what to hold out, one value at a time (default %(default)s)")
    p.add_argument("--out", required=True, help="folder for the fold runs and results")
    p.add_argument("--no-random-split", action="store_true",
                   help="skip the random-split run that sits beside the folds")
    p.add_argument("--bootstrap", type=int, default=500)
    p.add_argument("--baseline-only", action="store_true",
                   help="only the thumbnail logistic regression on the same folds (seconds)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted cross-validation in --out: finished folds are "
                        "reused, an interrupted fold resumes (same options required)")
    _add_train_options(p)
    p.set_defaults(func=cmd_crossval)

    p = commands.add_parser("predict", help="P(COVID) and label for images and folders")
    p.add_argument("run")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (recursive)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--csv", metavar="FILE", help="also write the results to a CSV file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--explain", metavar="DIR", help="also write Grad-CAM overlays to DIR")
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("explain", help="Grad-CAM heat maps blended over the images")
    p.add_argument("run")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--out", required=True, help="folder for the <name>_gradcam.png files")
    p.add_argument("--alpha", type=float, default=0.4, help="heat-map opacity (default 0.4)")
    p.set_defaults(func=cmd_explain)

    p = commands.add_parser("report", help="one self-contained HTML report with a model card")
    p.add_argument("run")
    p.add_argument("--out", default="report.html", help="HTML file (default %(default)s)")
    p.add_argument("--no-audit", action="store_true", help="skip the data audit")
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("serve", help="web page and REST API for a run")
    p.add_argument("run")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-upload-mb", type=float, default=20.0,
                   help="request size limit, answered 413 (default %(default)s)")
    p.add_argument("--max-pixels", type=int, default=60_000_000,
                   help="refuse images with more pixels (decompression bombs)")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("demo", help="the whole pipeline in a few minutes, offline")
    p.add_argument("data", nargs="?", help="a data set (default: synthetic images made now)")
    p.add_argument("--out", default="demo-run", help="folder for everything the demo writes")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--n-per-class", type=int, default=80, help="synthetic images per class")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr)
    from covidxray.data.dataset import DataError
    from covidxray.model.network import WeightsUnavailableError
    from covidxray.pixels.imageio import ImageReadError
    from covidxray.run.predictor import RunError
    from covidxray.training.fit import RunExistsError
    try:
        return args.func(args)
    except UsageError as exc:
        parser.error(str(exc))
    except (DataError, ImageReadError, WeightsUnavailableError, RunError, RunExistsError,
            FileNotFoundError, ValueError) as exc:
        print(f"covidxray {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"covidxray {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
