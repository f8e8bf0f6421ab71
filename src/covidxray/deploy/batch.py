"""Scoring an archive: every file of some folders and lists, one result row each, written as it
goes and resumed where it stopped.

Results go to a CSV file (appended and flushed a chunk at a time) or a Parquet dataset (a folder
of part files, each written to a temporary name and renamed). Running the same command again
reads the paths already there and scores only the others, so a killed job resumes and each
file ends up in the output exactly once. Memory does not grow with the archive: results leave
a chunk at a time.

``engine="local"``: this process, decoding in threads while the model runs. ``engine="ray"``:
Ray Data (``pip install covidxray[ray]``) on this machine (``ray.init()``) or on a cluster
(``address``): decoding in parallel tasks, scoring in a pool of actors that each load the model
once.
"""

from __future__ import annotations

import csv
import functools
import io
import logging
import os
import time
from pathlib import Path

from covidxray.fileutil import atomic_path
from covidxray.progress import progress
from covidxray.run.predictor import Prediction, Predictor, collect_paths, \
    input_preprocessing_of, load_segmenter, prepare_input

log = logging.getLogger(__name__)

COLUMNS = ("path", "input_sha256", "probability", "label", "positive", "verdict",
           "prediction_set", "class_probabilities", "ood", "ood_reason", "feature_distance",
           "error", "model_id", "synthetic_data")
CHUNK = 256  # rows written at a time
ERROR_EXAMPLES = 20  # unreadable files named in the summary (all are in the output)


def input_paths(sources) -> list[str]:
    """The files of ``sources``: folders (searched recursively), CSV lists of paths (column
    ``path`` or ``file``, relative to the list), or image files."""
    paths = []
    for source in map(Path, sources):
        if source.is_file() and source.suffix.lower() == ".csv":
            with open(source, newline="") as handle:
                for row in csv.DictReader(handle):
                    value = row.get("path") or row.get("file") or ""
                    if value:
                        path = Path(value)
                        paths.append(str(path if path.is_absolute() else source.parent / path))
        else:
            paths += collect_paths([source])
    return paths


def key(path: str) -> str:
    """A path resolved (absolute, links followed: the same file however it is named), as it
    can be stored (a name that is not valid UTF-8 keeps its odd bytes as backslash escapes):
    what a result row holds and resuming compares."""
    return str(Path(path).resolve()).encode("utf-8", "backslashreplace").decode("utf-8")


def row_of(prediction: Prediction, metadata) -> dict:
    """A result row: the prediction, and which model made it (trained on synthetic data?)."""
    import json
    values = prediction.to_dict()
    chosen = values.get("prediction_set")
    classes = values.get("class_probabilities")
    return {**{name: values.get(name) for name in COLUMNS}, "path": key(prediction.path),
            "prediction_set": None if chosen is None else "|".join(chosen),
            "class_probabilities": None if classes is None else json.dumps(classes),
            "model_id": metadata.model_id, "synthetic_data": metadata.synthetic_data}


class CsvResults:
    """Results appended to a CSV file; a last row cut short by a kill is dropped on resume (and
    its file scored again), with a notice."""

    def __init__(self, path: Path, model_id: str):
        self.path = path
        self.done = set()
        if path.is_file() and path.stat().st_size:
            rows = self._rows_kept()
            _check_model(path, {r["model_id"] for r in rows}, model_id)
            self.done = {key(r["path"]) for r in rows}
        else:
            with atomic_path(path) as tmp:
                tmp.write_text(",".join(COLUMNS) + "\n", encoding="utf-8")

    def _rows_kept(self) -> list[dict]:
        """The complete rows; a cut last row is removed from the file. A cut row before the
        last is damage this cannot repair: an error naming its line."""
        data = self.path.read_bytes()
        parsed = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
        if not parsed or tuple(parsed[0]) != COLUMNS:
            raise ValueError(f"{self.path}: not a results file of this covidxray version (its "
                             f"header is not {','.join(COLUMNS)}); write the results to "
                             f"another file")
        complete = [len(row) == len(COLUMNS) for row in parsed]
        if not data.endswith(b"\n") or not complete[-1]:
            # the last row was being written when the job stopped
            end = len(data) - 1 if data.endswith(b"\n") else len(data)
            cut = data.rfind(b"\n", 0, end) + 1
            log.warning("%s: its last row was cut short (%r): dropped, and that file is "
                        "scored again", self.path, data[cut:cut + 60].decode("utf-8", "replace"))
            with open(self.path, "r+b") as handle:
                handle.truncate(cut)
            parsed, complete = parsed[:-1], complete[:-1]
        if not all(complete):
            raise ValueError(f"{self.path}: line {complete.index(False) + 1} is not a complete "
                             f"result row; the file is damaged: remove that line, or write to "
                             f"another file")
        return [dict(zip(COLUMNS, row)) for row in parsed[1:]]

    def write(self, rows: list[dict]) -> None:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(buffer.getvalue())
            handle.flush()
            os.fsync(handle.fileno())


class ParquetResults:
    """Results as a Parquet dataset: a folder of ``part-NNNNNN.parquet`` files, each complete
    once it has its name."""

    def __init__(self, folder: Path, model_id: str):
        import pyarrow.parquet as pq
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        parts = sorted(folder.glob("part-*.parquet"))
        tables = [pq.read_table(part, columns=["path", "model_id"]) for part in parts]
        _check_model(folder, {m for t in tables for m in t.column("model_id").to_pylist()},
                     model_id)
        self.done = {key(p) for t in tables for p in t.column("path").to_pylist()}
        self.next_part = 1 + max((int(p.stem.split("-")[1]) for p in parts), default=-1)

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.Table.from_pylist(rows, schema=result_schema())
        target = self.folder / f"part-{self.next_part:06d}.parquet"
        with atomic_path(target, suffix=".parquet") as tmp:
            pq.write_table(table, tmp)
        self.next_part += 1


def result_schema():
    import pyarrow as pa
    return pa.schema([("path", pa.string()), ("input_sha256", pa.string()),
                      ("probability", pa.float64()), ("label", pa.string()),
                      ("positive", pa.bool_()), ("verdict", pa.string()),
                      ("prediction_set", pa.string()), ("class_probabilities", pa.string()),
                      ("ood", pa.bool_()), ("feature_distance", pa.float64()),
                      ("ood_reason", pa.string()), ("error", pa.string()),
                      ("model_id", pa.string()), ("synthetic_data", pa.bool_())])


def _check_model(where: Path, found: set, model_id: str) -> None:
    others = found - {model_id}
    if others:
        raise ValueError(f"{where} holds results of another model ({', '.join(sorted(others))}"
                         f"); write this model's to another file")


def open_results(out: str | Path, model_id: str):
    out = Path(out)
    if out.suffix.lower() == ".csv":
        return CsvResults(out, model_id)
    if out.suffix.lower() == ".parquet":
        return ParquetResults(out, model_id)
    raise ValueError(f"{out}: results go to a .csv file or a .parquet folder")


def score(run: str | Path, sources, out: str | Path, engine: str = "local",
          address: str | None = None, workers: int = 2, batch_size: int = 32,
          quiet: bool = False, chunk: int = CHUNK) -> dict:
    """Score every file of ``sources`` with ``run`` (a run folder or an exported model) into
    ``out``, skipping the files already there, ``chunk`` rows written at a time; returns the
    counts and the rate."""
    from covidxray.run.metadata import METADATA_FILE, RunMetadata
    metadata = RunMetadata.load(Path(run) / METADATA_FILE)
    model_id = metadata.model_id
    results = open_results(out, model_id)
    # each file once, however often and however it is named among the sources
    paths = list({key(p): p for p in input_paths(sources)}.values())
    todo = [p for p in paths if key(p) not in results.done]
    bar = progress(desc="scored", total=len(todo), unit="file", enabled=not quiet)
    started = time.monotonic()
    counts = {"files": len(paths), "already_done": len(paths) - len(todo), "scored": 0,
              "errors": 0}
    examples = []  # the first files that could not be read, to name them
    distances = []  # the gate's feature distances of the files scored now: the drift test
    chunks = (_score_on_ray(run, todo, address, workers, batch_size, chunk)
              if engine == "ray"
              else _score_locally(run, todo, batch_size, chunk) if engine == "local"
              else _unknown(engine))
    try:
        for rows in chunks:
            results.write(rows)
            counts["scored"] += len(rows)
            failed = [(r["path"], r["error"]) for r in rows if r["error"]]
            distances += [r["feature_distance"] for r in rows if r["feature_distance"] is not None]
            counts["errors"] += len(failed)
            examples += failed[:ERROR_EXAMPLES - len(examples)]
            bar.update(len(rows))
    finally:
        bar.close()
    seconds = time.monotonic() - started
    drift = _drift(run, distances)
    return {**counts, "error_examples": examples, "seconds": round(seconds, 1),
            "drift": None if drift is None else drift.to_dict(),
            "files_per_s": round(counts["scored"] / seconds, 2) if seconds else None,
            "out": str(out), "model_id": model_id}


def _drift(run, distances: list[float]):
    """The drift test of the files scored now against the run's validation films."""
    from covidxray.run.ood import OOD_FILE, OODGate
    gate_file = Path(run) / OOD_FILE
    if not distances or not gate_file.is_file():
        return None
    try:
        return OODGate.load(gate_file).drift_of_distances(distances)
    except (ValueError, KeyError):
        return None


def _unknown(engine: str):
    raise ValueError(f"unknown engine {engine!r}: local or ray")


def _score_locally(run, todo: list[str], batch_size: int, chunk: int):
    predictor = Predictor.load(run)
    for start in range(0, len(todo), chunk):
        yield [row_of(p, predictor.metadata) for p in predictor.predict_many(
            todo[start:start + chunk], batch_size=batch_size)]


def _score_on_ray(run, todo: list[str], address: str | None, workers: int,
                  batch_size: int, chunk: int):
    try:
        import ray
    except ImportError as exc:
        raise RuntimeError("--engine ray needs Ray: pip install 'covidxray[ray]'") from exc
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False, logging_level=logging.WARNING)
    # our own bar shows the progress; Ray Data's bars and notices only with --verbose
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = context.print_on_execution_start = False
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        dataset = ray.data.from_items([{"path": p} for p in todo])
        decoded = dataset.map_batches(_decode, fn_kwargs={"run": str(run)},
                                      batch_size=batch_size, batch_format="pyarrow")
        scored = decoded.map_batches(_Score, fn_constructor_kwargs={"run": str(run)},
                                     batch_size=batch_size,
                                     compute=ray.data.ActorPoolStrategy(size=workers),
                                     batch_format="pyarrow")
        for batch in scored.iter_batches(batch_size=chunk, batch_format="pyarrow"):
            yield batch.to_pylist()
    finally:
        ray.shutdown()


@functools.lru_cache(maxsize=2)
def _inputs(run: str):
    """What the run prepares an input with (its preprocessing, or its members', and its lung
    segmenter), loaded once per worker process."""
    return input_preprocessing_of(Path(run)), load_segmenter(Path(run))


def _decode(batch, run: str):
    """Ray stage 1, in parallel tasks: files -> the model's input and the lungs found (or why
    they cannot be read)."""
    import pickle

    import pyarrow as pa
    rows = []
    preprocessing, segmenter = _inputs(run)
    for path in batch.column("path").to_pylist():
        try:
            item = prepare_input(path, preprocessing, segmenter=segmenter)
            rows.append({"path": path, "image": item.image.tobytes(),
                         "shape": list(item.image.shape),
                         "colourfulness": item.colourfulness, "sha256": item.sha256,
                         "lungs": pickle.dumps(item.lungs), "error": None})
        except Exception as error:  # ImageReadError; anything else is this file's too
            rows.append({"path": path, "image": None, "shape": None, "colourfulness": 0.0,
                         "sha256": getattr(error, "sha256", None), "lungs": None,
                         "error": getattr(error, "reason", str(error))})
    return pa.Table.from_pylist(rows)


class _Score:
    """Ray stage 2: an actor that loads the model once and scores every batch it is given."""

    def __init__(self, run: str):
        self.predictor = Predictor.load(run)

    def __call__(self, batch):
        import pickle

        import numpy as np
        import pyarrow as pa

        from covidxray.run.predictor import Prepared
        rows, items, positions = batch.to_pylist(), [], []
        for index, row in enumerate(rows):
            if row["error"] is None:
                image = np.frombuffer(row["image"], np.uint8).reshape(row["shape"])
                size = image.shape[-1]
                # the decoded original stays in the task: no heat maps are made here
                items.append(Prepared(row["path"], image, image.reshape(-1, size, size)[0] / 255.0,
                                      row["colourfulness"], row["sha256"],
                                      (slice(0, size), slice(0, size)),
                                      pickle.loads(row["lungs"])))
                positions.append(index)
        predictions = dict(zip(positions, self.predictor.predict_items(items)))
        metadata = self.predictor.metadata
        out = [row_of(predictions[i], metadata) if i in predictions else
               row_of(Prediction(path=row["path"], error=row["error"],
                                 input_sha256=row["sha256"]), metadata)
               for i, row in enumerate(rows)]
        return pa.Table.from_pylist(out, schema=result_schema())
