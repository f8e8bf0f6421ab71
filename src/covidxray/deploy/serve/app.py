"""The web app: a REST API and a page for one trained run.

Uploads are read in memory (never written under a name the client chose), their type is taken
from their content, their pixel count is checked before decoding, and every failure is a 4xx
answer naming the reason; nothing a client sends can stop the server serving the next request.
"""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path

import numpy as np
from fastapi import FastAPI, File, HTTPException, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from PIL import Image
from pydantic import BaseModel

from covidxray.config import RESEARCH_NOTICE, SERVE
from covidxray.evaluation.explain import overlay
from covidxray.run.predictor import Predictor

STATIC = Path(__file__).parent / "static"
PREVIEW_SIZE = 512
INTENDED_USE = "Research on chest X-ray classification. " + RESEARCH_NOTICE


class OODVerdict(BaseModel):
    flag: bool | None
    reason: str | None


class ImageResult(BaseModel):
    filename: str
    probability: float | None = None
    label: str | None = None
    positive: bool | None = None
    threshold: float
    model_id: str
    ood: OODVerdict | None = None
    image_png: str | None = None
    heatmap_png: str | None = None
    overlay_png: str | None = None
    error: str | None = None


class PredictResponse(BaseModel):
    notice: str
    synthetic_data: bool
    results: list[ImageResult]


class RequestSizeLimit:
    """ASGI middleware: answer 413 to a request body over ``max_bytes``, declared or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        received = 0
        state = {"started": False, "rejected": False}

        async def limited_receive():
            nonlocal received
            if state["rejected"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes and not state["started"]:
                    # answer now; the app sees the client gone and its answer is dropped
                    state["rejected"] = True
                    await self._too_large(send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["rejected"]:
                return
            state["started"] = state["started"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not state["rejected"]:
                raise

    async def _too_large(self, send):
        body = (b'{"detail":"request body over the limit of %d bytes"}' % self.max_bytes)
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def _png(rgb_or_rgba: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(rgb_or_rgba).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _preview(gray: np.ndarray) -> np.ndarray:
    image = Image.fromarray(np.asarray(gray, np.float32), mode="F")
    scale = PREVIEW_SIZE / max(image.size)
    if scale < 1:
        image = image.resize((max(1, round(image.width * scale)),
                              max(1, round(image.height * scale))), Image.Resampling.BILINEAR)
    return np.asarray(image)


def _heatmap_rgba(heat: np.ndarray) -> np.ndarray:
    from matplotlib import colormaps
    rgba = colormaps["jet"](np.clip(heat, 0, 1))
    rgba[..., 3] = np.clip(heat, 0, 1)  # transparent where there is no heat
    return np.rint(rgba * 255).astype(np.uint8)


def create_app(run_dir: str | Path | None = None, predictor: Predictor | None = None,
               max_upload_bytes: int = int(SERVE.max_upload_mb * 1024 * 1024),
               max_pixels: int = SERVE.max_pixels) -> FastAPI:
    """The app for one run; the model is loaded once, here."""
    predictor = predictor or Predictor.load(run_dir)
    meta = predictor.metadata
    identifier = meta.model_id
    inference_lock = threading.Lock()  # one forward pass at a time; each request is a batch
    app = FastAPI(title="covidxray", version=meta.covidxray_version,
                  description=f"COVID-19 vs non-COVID chest X-ray classifier. {meta.notice}")

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "model_id": identifier}

    @app.get("/api/model")
    def model_card() -> dict:
        return {"model_id": identifier, "metadata": meta.public_dict(),
                "model_card": {"intended_use": INTENDED_USE, "notice": meta.notice,
                               "synthetic_data": meta.synthetic_data,
                               "threshold": meta.threshold,
                               "threshold_method": meta.threshold_method,
                               "validation_metrics": meta.validation_metrics,
                               "training_data": meta.split_counts,
                               "ood_gate": predictor.gate is not None}}

    @app.post("/api/predict", response_model=PredictResponse,
              responses={413: {"description": "request too large"},
                         422: {"description": "no uploaded file could be used as an image"}})
    def predict(files: list[UploadFile] = File(..., description="PNG, JPEG or DICOM images")):
        names = [Path(upload.filename or "upload").name[:200] for upload in files]
        with inference_lock:
            predictions = predictor.predict_many([upload.file.read() for upload in files],
                                                 names, heatmaps=True, max_pixels=max_pixels)
        if all(p.error for p in predictions):
            raise HTTPException(422, detail="; ".join(f"{p.path}: {p.error}"
                                                      for p in predictions) or "no file")
        return PredictResponse(notice=meta.notice, synthetic_data=meta.synthetic_data,
                               results=[_result(p) for p in predictions])

    def _result(prediction) -> ImageResult:
        common = dict(filename=prediction.path, threshold=predictor.threshold,
                      model_id=identifier)
        if prediction.error:
            return ImageResult(**common, error=prediction.error)
        preview, heat = _preview(prediction.image), _preview(prediction.heatmap)
        return ImageResult(
            **common, probability=prediction.probability, label=prediction.label,
            positive=prediction.positive,
            ood=OODVerdict(flag=prediction.ood, reason=prediction.ood_reason),
            image_png=_png(np.rint(preview * 255).astype(np.uint8)),
            heatmap_png=_png(_heatmap_rgba(heat)), overlay_png=_png(overlay(preview, heat)))

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.exception_handler(Exception)
    def unexpected(request, exc):  # never a traceback to the client; the server keeps serving
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)

    app.add_middleware(RequestSizeLimit, max_bytes=max_upload_bytes)
    return app
