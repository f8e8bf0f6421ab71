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
import tempfile
import time
from pathlib import Path

from covidxray.config import RUNTIMES
from covidxray.errors import UserError, require
from covidxray.fileutil import atomic_path
from covidxray.progress import progress
from covidxray.run.inputs import collect_paths, prepare_input
from covidxray.run.predictor import Predictor, input_preprocessing_of, load_segmenter
from covidxray.run.record import Prediction, arrow_schema, record_fields

log = logging.getLogger(__name__)

class ResultsFileError(UserError, ValueError):
    """A results file this job cannot append to (the message says why and what to do)."""


# besides the record's own fields (run.record): which model made each row
RUN_COLUMNS = [("model_id", "text"), ("synthetic_data", "bool")]
CHUNK = 256  # rows written at a time
ERROR_EXAMPLES = 20  # unreadable files named in the summary (all are in the output)


def key(path: str) -> str:
    """A path resolved (absolute, links followed: the same file however it is named), as it
    can be stored (a name that is not valid UTF-8 keeps its odd bytes as backslash escapes):
    what a result row holds and resuming compares."""
    path = Path(path)
    # a broken link keeps its own name: its row says the link cannot be read
    named = path.absolute() if path.is_symlink() and not path.exists() else path.resolve()
    return str(named).encode("utf-8", "backslashreplace").decode("utf-8")


def columns(record: type = Prediction) -> list[str]:
    """A result row's columns: the record's fields, then the run's."""
    return [f.name for f in record_fields(record)] + [name for name, _ in RUN_COLUMNS]


def row_of(prediction: Prediction, metadata) -> dict:
    """A result row: the prediction flat, and which model made it (trained on synthetic
    data?)."""
    return {**prediction.row(), "path": key(prediction.path), "model_id": metadata.model_id,
            "synthetic_data": metadata.synthetic_data}


class CsvResults:
    """Results appended to a CSV file; a last row cut short by a kill is dropped on resume (and
    its file scored again), with a notice. With ``retry_errors``, the rows of files that could
    not be read are taken out (the file rewritten whole, atomically) and those files tried
    again."""

    def __init__(self, path: Path, model_id: str, retry_errors: bool = True,
                 record: type = Prediction):
        self.path, self.columns = path, columns(record)
        self.done, self.retried = set(), 0
        if path.is_file() and path.stat().st_size:
            rows = self._rows_kept()
            _check_model(path, {r["model_id"] for r in rows}, model_id)
            if retry_errors and any(r["error"] for r in rows):
                kept = [r for r in rows if not r["error"]]
                self.retried = len(rows) - len(kept)
                with atomic_path(path) as tmp:
                    tmp.write_text(",".join(self.columns) + "\n" +
                                   _csv_text(kept, self.columns), encoding="utf-8")
                rows = kept
            self.done = {key(r["path"]) for r in rows}
        else:
            with atomic_path(path) as tmp:
                tmp.write_text(",".join(self.columns) + "\n", encoding="utf-8")

    def _rows_kept(self) -> list[dict]:
        """The complete rows; a cut last row is removed from the file. A cut row before the
        last is damage this cannot repair: an error naming its line."""
        data = self.path.read_bytes()
        parsed = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
        names = self.columns
        if not parsed or parsed[0] != names:
            raise ResultsFileError(f"{self.path}: not a results file of this covidxray version "
                                   f"(its header is not {','.join(names)}); write the "
                                   f"results to another file")
        complete = [len(row) == len(names) for row in parsed]
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
            raise ResultsFileError(f"{self.path}: line {complete.index(False) + 1} is not a "
                                   f"complete result row; the file is damaged: remove that "
                                   f"line, or write to another file")
        return [dict(zip(names, row)) for row in parsed[1:]]

    def write(self, rows: list[dict]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(_csv_text(rows, self.columns))
            handle.flush()
            os.fsync(handle.fileno())


class ParquetResults:
    """Results as a Parquet dataset: a folder of ``part-NNNNNN.parquet`` files, each complete
    once it has its name. With ``retry_errors``, a part that holds rows of files that could not
    be read is rewritten without them (atomically) and those files tried again."""

    def __init__(self, folder: Path, model_id: str, retry_errors: bool = True,
                 record: type = Prediction):
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
        self.folder, self.schema = folder, result_schema(record)
        folder.mkdir(parents=True, exist_ok=True)
        parts = sorted(folder.glob("part-*.parquet"))
        tables = [pq.read_table(part) for part in parts]
        _check_model(folder, {m for t in tables for m in t.column("model_id").to_pylist()},
                     model_id)
        self.retried = 0
        if retry_errors:
            for index, (part, table) in enumerate(zip(parts, tables)):
                failed = pc.invert(pc.is_null(table.column("error")))
                count = pc.sum(failed).as_py() or 0
                if count:
                    tables[index] = table.filter(pc.invert(failed))
                    with atomic_path(part, suffix=".parquet") as tmp:
                        pq.write_table(tables[index], tmp)
                    self.retried += count
        self.done = {key(p) for t in tables for p in t.column("path").to_pylist()}
        self.next_part = 1 + max((int(p.stem.split("-")[1]) for p in parts), default=-1)

    def write(self, rows: list[dict]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        table = pa.Table.from_pylist(rows, schema=self.schema)
        target = self.folder / f"part-{self.next_part:06d}.parquet"
        with atomic_path(target, suffix=".parquet") as tmp:
            pq.write_table(table, tmp)
        self.next_part += 1


def result_schema(record: type = Prediction):
    return arrow_schema(RUN_COLUMNS, record)


def _check_model(where: Path, found: set, model_id: str) -> None:
    others = found - {model_id}
    if others:
        raise ResultsFileError(f"{where} holds results of another model "
                               f"({', '.join(sorted(others))}); write this model's to another "
                               f"file")


def _csv_text(rows: list[dict], names: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def open_results(out: str | Path, model_id: str, retry_errors: bool = True):
    out = Path(out)
    if out.suffix.lower() not in (".csv", ".parquet"):
        raise UserError(f"{out}: results go to a .csv file or a .parquet folder")
    check_writable(out)
    if out.suffix.lower() == ".csv":
        return CsvResults(out, model_id, retry_errors)
    return ParquetResults(out, model_id, retry_errors)


def check_writable(out: str | Path) -> None:
    """Refuse, before anything is scored, an output that cannot be written, naming the folder:
    a file is made and removed where the results go (the folder itself for Parquet, the
    file's folder for CSV, or the first folder above them that exists), which is what tells
    a read-only disk or a folder of someone else's apart from one that can be written."""
    out = Path(out)
    folder = out if out.suffix.lower() == ".parquet" else out.parent
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"{folder} is a file: {out} cannot be made under it")
    if out.is_file() and not os.access(out, os.W_OK):
        raise UserError(f"{out}: no permission to write it; choose another file")
    try:
        handle, probe = tempfile.mkstemp(prefix=".covidxray-write-check-", dir=folder)
    except OSError as error:
        raise UserError(f"{folder}: cannot write there ({error.strerror or error}), so {out} "
                        f"cannot hold the results; choose a folder you can write to") from None
    os.close(handle)
    os.unlink(probe)


def score(run: str | Path, sources, out: str | Path, engine: str = "local",
          address: str | None = None, workers: int = 2, batch_size: int = 32,
          quiet: bool = False, chunk: int = CHUNK, gate: bool = True,
          retry_errors: bool = True, runtime: str = RUNTIMES[0]) -> dict:
    """Score every file of ``sources`` with ``run`` (a run folder or an exported model) into
    ``out``, skipping the files already there, ``chunk`` rows written at a time; returns the
    counts and the rate. ``retry_errors``: files whose rows say they could not be read (a
    file half-copied then) are tried again, their old rows replaced. ``gate=False``: no
    out-of-distribution gate."""
    from covidxray.run.folder import RunFolder
    metadata = RunFolder(run).metadata()
    model_id = metadata.model_id
    results = open_results(out, model_id, retry_errors)
    if results.retried:
        log.info("%s: %d files that could not be read before are tried again", out,
                 results.retried)
    # each file once, however often and however it is named among the sources
    paths = list({key(p): p for p in collect_paths(sources)}.values())
    todo = [p for p in paths if key(p) not in results.done]
    bar = progress(desc="scored", total=len(todo), unit="file", enabled=not quiet)
    started = time.monotonic()
    counts = {"files": len(paths), "already_done": len(paths) - len(todo), "scored": 0,
              "errors": 0, "retried": results.retried}
    examples = []  # the first files that could not be read, to name them
    distances = []  # the gate's feature distances of the files scored now: the drift test
    chunks = (_score_on_ray(run, todo, address, workers, batch_size, chunk, gate, runtime)
              if engine == "ray"
              else _score_locally(run, todo, batch_size, chunk, gate, runtime)
              if engine == "local" else _unknown(engine))
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
    drift = _drift(run, distances) if gate else None
    return {**counts, "error_examples": examples, "seconds": round(seconds, 1),
            "drift": None if drift is None else drift.to_dict(),
            "files_per_s": round(counts["scored"] / seconds, 2) if seconds else None,
            "out": str(out), "model_id": model_id}


def _drift(run, distances: list[float]):
    """The drift test of the files scored now against the run's validation films."""
    from covidxray.run.folder import RunFolder
    gate = RunFolder(run).gate() if distances else None
    return None if gate is None else gate.drift_of_distances(distances)


def _unknown(engine: str):
    raise UserError(f"unknown engine {engine!r}: local or ray")


def _score_locally(run, todo: list[str], batch_size: int, chunk: int, gate: bool = True,
                   runtime: str = RUNTIMES[0]):
    predictor = Predictor.load(run, gate=gate, runtime=runtime)
    for start in range(0, len(todo), chunk):
        yield [row_of(p, predictor.metadata) for p in predictor.predict_many(
            todo[start:start + chunk], batch_size=batch_size)]


def _score_on_ray(run, todo: list[str], address: str | None, workers: int,
                  batch_size: int, chunk: int, gate: bool = True,
                  runtime: str = RUNTIMES[0]):
    ray = require("ray", "--engine ray", "ray")
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
        scored = decoded.map_batches(_Score, fn_constructor_kwargs={"run": str(run),
                                                                    "gate": gate,
                                                                    "runtime": runtime},
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

    def __init__(self, run: str, gate: bool = True, runtime: str = RUNTIMES[0]):
        self.predictor = Predictor.load(run, gate=gate, runtime=runtime)

    def __call__(self, batch):
        import pickle

        import numpy as np
        import pyarrow as pa

        from covidxray.run.inputs import Prepared
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
