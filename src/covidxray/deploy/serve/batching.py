"""Requests that arrive together share one forward pass (dynamic batching, as Triton and
TorchServe do): each request decodes its own files in its own thread, then hands the prepared
films to one model thread, which takes every film waiting (up to ``max_films``), waits at most
``wait_s`` for more, and runs them all in a single pass. Under load the model runs one pass at
a time, never several at once contending for the cores, and each pass carries what queued
while the last ran. On a GPU a batch costs little more than one film; on a 2-core CPU
onnxruntime's time per film hardly changes with the batch, so waiting for more only leaves the
model idle: the server's default ``wait_s`` is 0 (``config.ServeConfig.batch_wait_ms``).
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from covidxray.deploy.memory import release_free_memory
from covidxray.run.inputs import Prepared

IDLE_S = 0.5  # no request for this long: freed memory is handed back


@dataclass
class _Job:
    items: list[Prepared]
    heatmaps: bool
    done: threading.Event = field(default_factory=threading.Event)
    predictions: list | None = None
    error: BaseException | None = None


class Batcher:
    """One model thread for a ``run.predictor.Predictor``: ``predict(items, heatmaps)`` from
    any thread, answered from a batch shared with whatever other requests came within
    ``wait_s``."""

    def __init__(self, predictor, max_films: int = 32, wait_s: float = 0.005):
        self.predictor, self.max_films, self.wait_s = predictor, max_films, wait_s
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="covidxray-batcher", daemon=True)
        self._thread.start()
        self.batches = 0  # forward passes run, and the films they held (for the metrics)
        self.films = 0

    def predict(self, items: list[Prepared], heatmaps: bool) -> list:
        """The predictions of prepared films (``Predictor.predict_items``), in their order."""
        if not items:
            return []
        job = _Job(items, heatmaps)
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.predictions

    def _run(self) -> None:
        while True:
            try:
                jobs = [self._jobs.get(timeout=IDLE_S)]
            except queue.Empty:  # idle: what the last answers let go goes back to the system
                release_free_memory()
                jobs = [self._jobs.get()]
            films = len(jobs[0].items)
            deadline = time.monotonic() + self.wait_s
            while films < self.max_films:
                try:
                    job = self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                jobs.append(job)
                films += len(job.items)
            self._answer(jobs)

    def _answer(self, jobs: list[_Job]) -> None:
        """One pass for every job's films (with heat maps if any job asks; a job that did not
        ask gets none)."""
        items = [item for job in jobs for item in job.items]
        try:
            predictions = self.predictor.predict_items(items, any(j.heatmaps for j in jobs))
        except BaseException as error:  # every waiting request hears of it
            for job in jobs:
                job.error = error
                job.done.set()
            return
        self.batches += 1
        self.films += len(items)
        start = 0
        for job in jobs:
            job.predictions = predictions[start:start + len(job.items)]
            start += len(job.items)
            if not job.heatmaps:  # what a request without heat maps gets, whatever the batch
                for prediction in job.predictions:
                    prediction.heatmap = prediction.image = prediction.lung_heat_share = None
            job.done.set()
