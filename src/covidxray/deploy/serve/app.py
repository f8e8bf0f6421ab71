"""The web app: a REST API and a page for one trained run.

Uploads are read from the request (Starlette keeps a file of up to 1 MB in memory and spools a
larger one to a temporary file, deleted after the request; no file is ever written under a name
the client chose). Each is typed by its content and sized from its header before it is decoded;
a request may carry ``max_files`` files and ``max_request_pixels`` declared pixels in all; the
model runs one request at a time and ``queue`` more may wait (then 503). Every failure to read a
file is answered for that file alone, naming the reason; nothing a client sends can stop the
server serving the next request. Every prediction is put on record.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import os
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Request, UploadFile
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from pydantic import BaseModel, create_model

from covidxray.config import RESEARCH_NOTICE, SERVE, STAND_IN_CAVEAT, ServeConfig
from covidxray.deploy.memory import limit_arenas
from covidxray.deploy.records import PredictionLog, RecordUnavailable, Served, \
    default_audit_url
from covidxray.deploy.serve.metrics import Metrics
from covidxray.deploy.serve.security import API_KEY_HEADER, APIKeys, FailedKeyThrottle, \
    RequestSizeLimit, SameOriginPost, SecurityHeaders
from covidxray.evaluation.explain import LUNG_OUTLINE_COLOUR, heat_colours, overlay
from covidxray.deploy.serve.batching import Batcher
from covidxray.run.inputs import Prepared
from covidxray.run.predictor import Predictor
from covidxray.run.record import Prediction, api_fields

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
PREVIEW_SIZE = 512
PNG_UP_FILTER = 2
PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # grey, grey + alpha, RGB, RGBA
INTENDED_USE = "Research on chest X-ray classification. " + RESEARCH_NOTICE
RETRY_AFTER_SECONDS = 5


class Presentation(BaseModel):
    """What an answer adds to the prediction's own record (``run.record.Prediction``, whose
    fields the answer carries, every one of them): the run's threshold and id, the set's
    confidence, and the images for the page."""

    threshold: float
    model_id: str
    confidence: float | None = None  # of the prediction set
    image_png: str | None = None
    heatmap_png: str | None = None
    overlay_png: str | None = None
    lung_outline_png: str | None = None  # the lungs found, outlined on a transparent image


def result_model(record: type = Prediction) -> type[BaseModel]:
    """One image's answer: ``Presentation`` and every field of the record."""
    return create_model("ImageResult", __base__=Presentation, **api_fields(record))


def response_model(image_result: type[BaseModel]) -> type[BaseModel]:
    """A request's answer: the notice, and one ``image_result`` per file."""
    return create_model("PredictResponse", notice=(str, ...), synthetic_data=(bool, ...),
                        request_id=(str, ...), results=(list[image_result], ...))


def _png(pixels: np.ndarray) -> str:
    """A uint8 grey (h, w) or (h, w, 1 to 4 channels: grey, grey + alpha, RGB, RGBA) image
    as a PNG data URL.

    Written here rather than by Pillow: every row takes PNG's "Up" filter (its difference from
    the row above, computed by numpy for the whole image at once) and zlib's fastest level.
    Pillow tries each of the five filters on every row; on these previews that doubled the
    time for files within a few per cent of the same size (docs/benchmarks.md)."""
    if pixels.dtype != np.uint8:
        raise TypeError(f"a PNG preview is made of bytes, not {pixels.dtype}")
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = np.ascontiguousarray(pixels).reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), np.uint8)
    filtered[:, 0] = PNG_UP_FILTER
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # modulo 256, as PNG wants
    header = struct.pack(">IIBBBBB", width, height, 8, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    data = b"".join([b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", zlib.compress(filtered.tobytes(), 1)),
                     _png_chunk(b"IEND", b"")])
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data))


def _preview(gray: np.ndarray) -> np.ndarray:
    image = Image.fromarray(np.asarray(gray, np.float32), mode="F")
    scale = PREVIEW_SIZE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)),
                              max(1, round(image.height * scale))), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _outline_rgba(outline: np.ndarray) -> np.ndarray:
    """A lung outline as a transparent image with the outline drawn opaque."""
    rgba = np.zeros((*outline.shape, 4), np.uint8)
    rgba[outline] = (*LUNG_OUTLINE_COLOUR, 255)
    return rgba


def _heatmap_rgba(heat: np.ndarray) -> np.ndarray:
    heat = np.clip(np.asarray(heat, np.float32), 0, 1)
    rgba = np.empty((*heat.shape, 4), np.uint8)
    rgba[..., :3] = heat_colours(heat, as_bytes=True)
    rgba[..., 3] = np.rint(heat * 255)  # clear where cold
    return rgba


def _cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def api_docs(openapi: dict) -> str:
    """The API documented in one self-contained page (the usual docs pages load their scripts
    from a CDN)."""
    esc = html.escape
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>"
             f"{esc(openapi['info']['title'])} API</title><link rel='stylesheet' "
             f"href='static/app.css'></head><body><h1>{esc(openapi['info']['title'])} API "
             f"{esc(openapi['info']['version'])}</h1>"
             f"<p>{esc(openapi['info'].get('description', ''))}</p>"
             f"<p>Machine-readable: <a href='openapi.json'>openapi.json</a>.</p>"]
    for path, methods in openapi["paths"].items():
        for method, operation in methods.items():
            responses = ", ".join(f"{code} {esc(r.get('description', ''))}"
                                  for code, r in operation.get("responses", {}).items())
            parts.append(f"<h2><code>{esc(method.upper())} {esc(path)}</code></h2>"
                         f"<p>{esc(operation.get('summary', ''))}</p>"
                         f"<p>{esc(operation.get('description', ''))}</p>"
                         f"<p>Responses: {responses}</p>")
    return "".join(parts) + "</body></html>"


def create_app(run_dir: str | Path | None = None, predictor: Predictor | None = None,
               settings: ServeConfig = SERVE) -> FastAPI:
    """The app for one run; the model is loaded once, here."""
    limit_arenas()  # before the request threads start: a worker's memory stays flat
    predictor = predictor or Predictor.load(run_dir, gate=settings.gate,
                                            runtime=settings.runtime)
    run_dir = run_dir or predictor.run_dir
    meta = predictor.metadata
    keys = APIKeys.load(settings.api_keys) if settings.api_keys else None
    throttle = FailedKeyThrottle(settings.key_failures_allowed)
    records = PredictionLog(settings.audit_db or default_audit_url(run_dir))
    metrics = Metrics()
    batcher = Batcher(predictor, settings.batch_films, settings.batch_wait_ms / 1000)
    admission = threading.BoundedSemaphore(settings.queue + 1)  # running + waiting
    # requests whose files are decoded and prepared at once: as many as the cores the model's
    # thread leaves (more only contend for them: on two cores, one at a time answered 15% more
    # requests than eight; a container's CPU quota is not seen here, only its cores)
    preparing = threading.BoundedSemaphore(max(1, _cores() - 1))
    app = FastAPI(title="covidxray", version=meta.covidxray_version, docs_url=None,
                  redoc_url=None,
                  description=f"COVID-19 vs non-COVID chest X-ray classifier. {meta.notice}")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.record_url = records.url

    def caller(request: Request) -> str | None:
        """The API key id of the request (None without keys); 401 when a key is needed."""
        if keys is None:
            return None
        client = request.client.host if request.client else "unknown"
        wait = throttle.retry_after(client)
        if wait:
            metrics.requests.labels("429").inc()
            raise HTTPException(429, detail=f"too many wrong API keys from {client}: try again "
                                            f"in {wait:.0f} s",
                                headers={"Retry-After": str(max(1, round(wait)))})
        given = request.headers.get(API_KEY_HEADER)
        bearer = request.headers.get("authorization", "")
        if not given and bearer.lower().startswith("bearer "):
            given = bearer[7:]
        key_id = keys.identify(given)
        if key_id is None:
            if given:
                throttle.failed(client)
            raise HTTPException(401, detail="an API key is needed (header X-API-Key)",
                                headers={"WWW-Authenticate": "Bearer"})
        throttle.succeeded(client)
        return key_id

    @app.get("/health")
    def health() -> JSONResponse:
        problem = records.check()
        if problem:  # answers would be refused: say so to the load balancer
            return JSONResponse({"status": "unavailable", "model_id": meta.model_id,
                                 "record": f"cannot be written: {problem}"}, status_code=503)
        return JSONResponse({"status": "ok", "model_id": meta.model_id})

    @app.get("/api/model")
    def model_card(request: Request) -> dict:
        caller(request)
        return {"model_id": meta.model_id, "metadata": meta.public_dict(),
                "model_card": {"intended_use": INTENDED_USE, "notice": meta.notice,
                               "limitations": STAND_IN_CAVEAT,
                               "synthetic_data": meta.synthetic_data,
                               "threshold": meta.threshold,
                               "threshold_method": meta.threshold_method,
                               "classes": meta.output_classes or [meta.positive_class,
                                                                  meta.negative_label],
                               "validation_metrics": meta.validation_metrics,
                               "training_data": meta.split_counts,
                               "ood_gate": predictor.gate is not None,
                               "prediction_sets": None if predictor.conformal is None else {
                                   "confidence": meta.confidence,
                                   "calibration_images": predictor.conformal.sizes,
                                   "holds_for": "films like the validation films (the "
                                                "error rate is not measured elsewhere)"},
                               "lung_segmenter": None if predictor.segmenter is None else
                               predictor.segmenter.card.name}}

    @app.get("/metrics", include_in_schema=False)
    def prometheus(request: Request) -> Response:
        caller(request)
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    ImageResult = result_model()
    PredictResponse = response_model(ImageResult)

    @app.post("/api/predict", response_model=PredictResponse,
              responses={401: {"description": "an API key is needed"},
                         403: {"description": "a cross-site request"},
                         413: {"description": "request too large (bytes, files or pixels)"},
                         429: {"description": "too many wrong API keys: try again after "
                                              "Retry-After seconds"},
                         422: {"description": "no uploaded file could be used as an image"},
                         503: {"description": "busy: try again after Retry-After seconds"}})
    def predict(request: Request,
                files: list[UploadFile] = File(..., description="PNG, JPEG or DICOM images"),
                heatmap: bool = Query(False, description="add the Grad-CAM heat map, the "
                                      "preview and the lung outline: the layers the page "
                                      "shows one above the other"),
                with_overlay: bool = Query(False, alias="overlay", description="add the "
                                           "overlay as well: the heat map and the outline "
                                           "burnt into the preview, one image (with the "
                                           "heat map's layers)")):
        started = time.monotonic()
        key_id = caller(request)
        if len(files) > settings.max_files:
            metrics.requests.labels("413").inc()
            raise HTTPException(413, detail=f"{len(files)} files: at most {settings.max_files} "
                                            f"per request")
        names = [Path(upload.filename or "upload").name[:200] for upload in files]
        contents = [upload.file.read() for upload in files]
        declared = sum(predictor.declared_pixels(data, name)
                       for name, data in zip(names, contents))
        if declared > settings.max_request_pixels:
            metrics.requests.labels("413").inc()
            raise HTTPException(413, detail=f"the images declare {declared} pixels in all: at "
                                            f"most {settings.max_request_pixels} per request")
        if not admission.acquire(blocking=False):
            metrics.requests.labels("503").inc()
            raise HTTPException(503, detail="the model is busy; try again shortly",
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
        try:  # decoded here, in this request's thread; scored in a pass shared with others
            with preparing:
                read = [predictor.prepare_or_error(data, name, settings.max_pixels)
                        for data, name in zip(contents, names)]
            scored = iter(batcher.predict([x for x in read if isinstance(x, Prepared)],
                                          heatmap or with_overlay))
            predictions = [next(scored) if isinstance(x, Prepared) else x for x in read]
        finally:
            admission.release()
        request_id = uuid.uuid4().hex
        try:
            records.record([Served(p, request_id, meta.model_id,
                                   hashlib.sha256(data).hexdigest(), key_id)
                            for p, data in zip(predictions, contents)])
        except RecordUnavailable as error:  # no answer that is not on record
            metrics.requests.labels("503").inc()
            raise HTTPException(503, detail=f"{error}: no answer is given that is not on "
                                            f"record; try again later",
                                headers={"Retry-After": str(RETRY_AFTER_SECONDS)}) from None
        for p in predictions:
            if p.error:
                metrics.errors.inc()
            else:
                metrics.images.labels(p.label or "no verdict", str(bool(p.ood)).lower()).inc()
        metrics.latency.observe(time.monotonic() - started)
        if all(p.error for p in predictions):
            metrics.requests.labels("422").inc()
            raise HTTPException(422, detail="; ".join(f"{p.path}: {p.error}"
                                                      for p in predictions) or "no file",
                                headers={"X-Request-ID": request_id})
        metrics.requests.labels("200").inc()
        return JSONResponse(PredictResponse(
            notice=meta.notice, synthetic_data=meta.synthetic_data, request_id=request_id,
            results=[_result(p, with_overlay) for p in predictions]).model_dump(),
            headers={"X-Request-ID": request_id})

    def _result(prediction, with_overlay: bool):
        common = dict(prediction.to_dict(), threshold=predictor.threshold,
                      model_id=meta.model_id,
                      confidence=meta.confidence if prediction.verdict else None)
        if prediction.error or prediction.heatmap is None:  # no heat maps asked for
            return ImageResult(**common)
        preview, heat = _preview(prediction.image), _preview(prediction.heatmap)
        outline = prediction.lungs.outline(preview.shape) if prediction.lungs_found else None
        return ImageResult(
            **common, image_png=_png(np.rint(preview * 255).astype(np.uint8)),
            heatmap_png=_png(_heatmap_rgba(heat)),
            overlay_png=_png(overlay(preview, heat, outline=outline)) if with_overlay
            else None,
            lung_outline_png=None if outline is None else _png(_outline_rgba(outline)))

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/docs", include_in_schema=False)
    def docs():
        return HTMLResponse(api_docs(app.openapi()))

    @app.exception_handler(Exception)
    def unexpected(request, exc):  # never a traceback to the client; the server keeps serving
        log.exception("unexpected error serving %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    # outermost last: hosts are checked first, and every answer carries the security headers
    app.add_middleware(SameOriginPost, allowed_origins=settings.cors_origins)
    app.add_middleware(RequestSizeLimit, max_bytes=int(settings.max_upload_mb * 1024 * 1024))
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=[API_KEY_HEADER, "authorization"])
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(settings.allowed_hosts))
    app.add_middleware(SecurityHeaders)
    return app


SETTINGS_ENV = "COVIDXRAY_SERVE"


def app_from_environment() -> FastAPI:
    """The app of ``covidxray serve --workers N``: each worker process builds its own from the
    settings the parent put in the environment."""
    import json
    values = json.loads(os.environ[SETTINGS_ENV])
    run_dir = values.pop("run")
    return create_app(run_dir, settings=ServeConfig(**values))
