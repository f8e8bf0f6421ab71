"""The ``covidxray`` commands: each ``cmd_*`` makes one ``covidxray.api`` call with the parsed
arguments and prints what it did; it returns the exit status."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from covidxray import api
from covidxray.api import DICOM_NODE, RESEARCH_NOTICE, SERVE
from covidxray.cli.parser import NODE_OPTIONS, SERVE_OPTIONS, train_options


class UsageError(Exception):
    """A command line that parses but cannot run as given: answered as argparse answers its
    own usage errors (exit status 2)."""


def _given(args, *names) -> dict:
    """The named options that were given (absent ones: the API's default applies)."""
    return {name: getattr(args, name) for name in names if name in args}


def _verbosity(quiet: bool) -> int:
    """Keras progress: none when quiet, bars on a terminal, one line per epoch in a log."""
    return 0 if quiet else (1 if sys.stdout.isatty() else 2)


def _report_failures(predictions) -> int:
    """Each file that could not be read, on standard error; the exit status."""
    failed = [p for p in predictions if p.error]
    for p in failed:
        print(f"error: {p.path}: {p.error}", file=sys.stderr)
    return 1 if failed else 0


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
    result = api.evaluate(args.run, args.data or None, gate=not args.no_gate,
                          runtime=args.runtime,
                          **_given(args, "bootstrap", "shortcut_images", "source_from_prefix",
                                   "out", "seed", "strict"))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(api.format_evaluation(result))
        print(f"\nmetrics written to {result.metrics_file}")
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


def cmd_explain(args) -> int:
    results = api.explain_files(args.run, args.images, args.out, alpha=args.alpha,
                                gate=not args.no_gate, runtime=args.runtime)
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


def cmd_serve(args) -> int:
    args.run = default_run(args.run)
    settings = {**_given(args, *SERVE_OPTIONS), "gate": not args.no_gate,
                "runtime": args.runtime}
    for name in ("allowed_hosts", "cors_origins"):
        if name in settings:
            settings[name] = tuple(settings[name])
    config = dataclasses.replace(SERVE, **settings)  # out-of-range values stop here, unannounced
    print(f"{RESEARCH_NOTICE}\nserving {args.run} on http://{config.host}:{config.port}/ "
          f"(API docs at /docs, metrics at /metrics)")
    api.serve(args.run, **settings)
    return 0


def cmd_dicom_node(args) -> int:
    args.run = default_run(args.run)
    settings = {**_given(args, *NODE_OPTIONS), "gate": not args.no_gate,
                "runtime": args.runtime}
    if args.status:
        status = api.dicom_node_status(args.run, settings.get("outbox"))
        print(json.dumps(status, indent=2) if args.json else
              f"{status['waiting']} results wait in {status['folder']} for the PACS"
              + (f" (the oldest since {status['oldest_waiting_since']}; last error: "
                 f"{status['last_error']}; next try {status['next_attempt']})"
                 if status["waiting"] else "")
              + (f"; {status['expired']} expired, set aside in "
                 f"{Path(status['folder']) / 'expired'}" if status["expired"] else ""))
        return 0
    for name in ("allowed_aes", "allowed_hosts"):
        if name in settings:
            settings[name] = tuple(settings[name])
    dataclasses.replace(DICOM_NODE, **settings)  # out-of-range values stop here
    print(RESEARCH_NOTICE)  # the node says where it listens once it does (its log)
    api.dicom_node(args.run, **settings)
    return 0


def cmd_export(args) -> int:
    record = api.export(args.run, args.out, args.format, force=args.force)
    print(f"exported to {args.out}: P(COVID) within {record['parity_max_abs_difference']:.1e} "
          f"of the run's on {record['parity_images']} of its validation images; "
          f"'covidxray predict {args.out} ...' and 'covidxray serve {args.out}' run it with "
          f"onnxruntime alone")
    return 0


def cmd_apikey(args) -> int:
    key = api.new_api_key(args.keys_file, args.id)
    print(f"new API key '{args.id}' (shown once; {args.keys_file} keeps only its hash):\n{key}")
    return 0


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
                         workers=args.workers, batch_size=args.batch_size,
                         gate=not args.no_gate, retry_errors=args.retry_errors,
                         runtime=args.runtime)
        retried = (f", {done['retried']} of them tried again after failing before"
                   if done["retried"] else "")
        print(f"{done['files']} files: {done['scored']} scored now{retried} "
              f"({done['errors']} could not be read), {done['already_done']} already in "
              f"{out}; {done['files_per_s']} files/s")
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
                          heatmaps=args.explain, gate=not args.no_gate, runtime=args.runtime)
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
