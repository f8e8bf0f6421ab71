"""The server's Prometheus metrics."""

from __future__ import annotations


class Metrics:
    """Prometheus counters and a latency histogram; across worker processes when
    ``PROMETHEUS_MULTIPROC_DIR`` is set (``covidxray serve --workers N`` sets it)."""

    def __init__(self):
        import os

        from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess
        self.registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            multiprocess.MultiProcessCollector(self.registry)
            registry = None  # the processes' files are read at scrape time
        else:
            registry = self.registry
        self.requests = Counter("covidxray_requests_total", "Prediction requests by outcome",
                                ["status"], registry=registry)
        self.images = Counter("covidxray_images_total", "Images scored, by label and verdict",
                              ["label", "ood"], registry=registry)
        self.errors = Counter("covidxray_image_errors_total", "Images that could not be read",
                              registry=registry)
        self.latency = Histogram("covidxray_request_seconds", "Time to answer a prediction "
                                 "request", registry=registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))

    def exposition(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
