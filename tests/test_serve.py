"""The web app: API, input safety, a real server on loopback, the page in a browser, and
schemathesis against the OpenAPI schema."""

import base64
import io
import re
import socket
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from covidxray.config import ServeConfig  # noqa: E402
from covidxray.deploy.serve.app import create_app  # noqa: E402


def png_bytes(array) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width=6000, height=6000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (over the app limit of 20 M)."""
    data = bytearray(png_bytes(np.zeros((8, 8), np.uint8)))
    ihdr = 16  # after the 8-byte signature, 4-byte length and b"IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[12:ihdr + 13])))
    return bytes(data)


def settings_for(tmp_path, **changes) -> ServeConfig:
    """Small limits, the test client's host allowed, the record in ``tmp_path``."""
    values = dict(max_upload_mb=1.0, max_pixels=20_000_000, max_request_pixels=40_000_000,
                  allowed_hosts=("testserver", "127.0.0.1", "localhost"),
                  audit_db=f"sqlite:///{tmp_path / 'predictions.sqlite'}")
    return ServeConfig(**{**values, **changes})


@pytest.fixture(scope="module")
def app(tiny_run, tmp_path_factory):
    return create_app(tiny_run, settings=settings_for(tmp_path_factory.mktemp("serve")))


@pytest.fixture(scope="module")
def client(app):
    return TestClient(app)


@pytest.fixture(scope="module")
def xray(tiny_run) -> bytes:
    """A training image of the run that its gate accepts. (On this tiny run the gate's
    thresholds come from 4 validation images, so some training images fall outside them;
    test_ood checks the gate's rates on enough images.)"""
    import csv

    from covidxray.run.predictor import Predictor
    paths = [r["path"] for r in csv.DictReader(open(tiny_run / "split.csv"))
             if r["split"] == "train"]
    accepted = [p.path for p in Predictor.load(tiny_run).predict_paths(paths) if not p.ood]
    return open(accepted[0], "rb").read()


def test_health_and_model_card(client):
    assert client.get("/health").json()["status"] == "ok"
    card = client.get("/api/model").json()
    assert card["model_card"]["ood_gate"] is True
    assert "Not a medical device" in card["model_card"]["notice"]
    assert "weak stand-ins for a new hospital" in card["model_card"]["limitations"]
    assert card["metadata"]["positive_class"] == "COVID"
    assert client.get("/openapi.json").json()["paths"]["/api/predict"]


@pytest.mark.parametrize("shape", [(37, 53), (20, 31, 3), (64, 48, 4), (1, 1), (5, 1, 4)])
def test_png_previews_decode_to_their_pixels(shape):
    """The answer's own PNG writer: what any decoder reads back is the image, exactly."""
    from covidxray.deploy.serve.app import _png
    pixels = np.random.default_rng(len(shape)).integers(0, 256, shape, dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(
        _png(pixels).split(",", 1)[1])))), pixels)


def test_predict_several_images(client, xray):
    photo = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
    response = client.post("/api/predict?heatmap=1", files=[
        ("files", ("a.png", xray, "image/png")), ("files", ("photo.png", png_bytes(photo)))])
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert 0 <= first["probability"] <= 1 and first["label"] in ("COVID", "NON-COVID")
    assert first["ood"] is False and first["model_id"]
    for key in ("image_png", "heatmap_png"):
        assert first[key].startswith("data:image/png;base64,")
    assert first["overlay_png"] is None  # asked for alone
    burnt = client.post("/api/predict?overlay=1", files=[("files", ("a.png", xray))])
    overlay = burnt.json()["results"][0]
    assert overlay["overlay_png"].startswith("data:image/png;base64,")
    assert overlay["heatmap_png"] == first["heatmap_png"]  # with the layers, the same ones
    assert second["ood"] is True and "not like a frontal chest X-ray" in second["ood_reason"]
    assert response.json()["synthetic_data"] is True
    lean = client.post("/api/predict", files=[("files", ("a.png", xray, "image/png"))])
    answer = lean.json()["results"][0]  # without heat maps: the same record, no images
    assert answer["probability"] == pytest.approx(first["probability"], abs=1e-6)
    assert answer["image_png"] is None and answer["heatmap_png"] is None
    assert answer["lung_heat_share"] is None


def test_dicom_upload(client, tmp_path):
    from test_decode import write_dicom
    gray = (np.asarray(Image.open(io.BytesIO(png_bytes(
        np.tile(np.linspace(0, 4095, 64), (64, 1)).astype(np.uint16))))))
    path = write_dicom(tmp_path / "x", gray)
    response = client.post("/api/predict", files=[("files", ("scan", path.read_bytes()))])
    assert response.status_code == 200 and response.json()["results"][0]["probability"] >= 0


@pytest.mark.parametrize("name,content,reason", [
    ("notes.png", b"plain text, not an image", "not a recognised image"),
    ("empty.jpg", b"", "empty file"),
    ("cut.png", png_bytes(np.zeros((64, 64), np.uint8))[:60], "truncated"),
    ("bomb.png", bomb_png(), "over the limit"),
    ("fake.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00" * 40, "DICOM"),
])
def test_bad_inputs_are_422_naming_the_reason(client, xray, name, content, reason):
    response = client.post("/api/predict", files=[("files", (name, content))])
    assert response.status_code == 422 and reason in response.json()["detail"]
    assert name in response.json()["detail"]
    # ... and the server still serves the next request
    assert client.post("/api/predict", files=[("files", ("a.png", xray))]).status_code == 200


def test_bad_file_beside_good_ones_is_reported_per_image(client, xray):
    response = client.post("/api/predict", files=[("files", ("a.png", xray)),
                                                  ("files", ("bad.png", b"xx"))])
    assert response.status_code == 200
    assert [r["error"] is None for r in response.json()["results"]] == [True, False]


def test_request_over_the_limit_is_413(client, xray):
    response = client.post("/api/predict", files=[("files", ("big.png", b"\0" * 1_100_000))])
    assert response.status_code == 413

    def chunks():  # no Content-Length: the limit must hold on the stream too
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"x.png\"\r\n\r\n"
        for _ in range(30):
            yield b"\0" * 65536
        yield b"\r\n--b--\r\n"
    response = client.post("/api/predict", content=chunks(),
                           headers={"content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413
    assert client.post("/api/predict", files=[("files", ("a.png", xray))]).status_code == 200


def test_client_file_name_is_never_used_as_a_path(client, xray, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    response = client.post("/api/predict", files=[("files", ("../../evil.png", xray))])
    assert response.json()["results"][0]["path"] == "evil.png"
    assert list(tmp_path.rglob("*")) == [] and not (tmp_path.parent / "evil.png").exists()


def test_missing_files_field_is_422(client):
    assert client.post("/api/predict").status_code == 422


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run, tmp_path_factory):
    """The command as a user runs it, with two worker processes."""
    port = free_port()
    record = tmp_path_factory.mktemp("server") / "predictions.sqlite"
    process = subprocess.Popen([sys.executable, "-m", "covidxray", "serve", str(tiny_run),
                                "--port", str(port), "--workers", "2",
                                "--audit-db", f"sqlite:///{record}"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("server did not start: " + process.stdout.read().decode()[-2000:])
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.mark.slow
def test_real_server_over_http(server, xray):
    import httpx
    assert httpx.get(server + "/health").json()["status"] == "ok"
    for _ in range(4):  # spread over both workers
        response = httpx.post(server + "/api/predict", files=[("files", ("a.png", xray))],
                              timeout=60)
        assert response.status_code == 200
    assert httpx.get(server + "/").text.count("Not a medical device") == 1
    metrics = httpx.get(server + "/metrics").text  # counted across the worker processes
    assert re.search(r'covidxray_requests_total\{status="200"\} 4\.0', metrics)
    assert httpx.get(server + "/health", headers={"host": "evil.example"}).status_code == 400


@pytest.mark.slow
def test_page_in_headless_chromium(server, tiny_data, tmp_path):
    pytest.importorskip("playwright.sync_api")
    import shutil

    from browser import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright
    if not shutil.which("chromium"):
        pytest.skip("Debian chromium is not installed")
    image = sorted((tiny_data / "COVID").glob("*.png"))[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server + "/")
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        # the tiny model may be sure of this film or not (each state's look has its own test)
        state = page.locator("#verdict").get_attribute("data-state")
        assert state in ("result", "uncertain", "unlike", "notfrontal")
        assert ("the model calls this image" in page.inner_text("#verdict")) == (state == "result")
        page.wait_for_function("document.getElementById('heat').naturalWidth > 0")
        assert page.is_visible("#synthetic") and "model" in page.inner_text("#model").lower()
        page.fill("#opacity", "20")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)

        # a file whose header carries markup: its error message quotes it, shown as text
        from pydicom import config

        from test_decode import write_dicom
        config.settings.writing_validation_mode = config.IGNORE
        try:
            payload = write_dicom(tmp_path / "payload.dcm", np.zeros((16, 16), np.uint16),
                                  photometric="<img src=x onerror=alert(1)>")
        finally:
            config.settings.writing_validation_mode = config.WARN
        page.set_input_files("#file", str(payload))
        page.wait_for_selector("#status .error", timeout=60_000)
        assert "<img src=x" in page.inner_text("#status").lower()  # the text, not an element
        assert page.locator("#status img").count() == 0
        browser.close()
    assert errors == []


def test_schemathesis_finds_no_server_error(app):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, settings
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    failures = []
    for operation in schema.get_all_operations():
        operation = operation.ok()

        @settings(max_examples=25, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        def check(case):
            response = case.call()
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path}: {response.status_code}")

        operation.as_strategy().example  # noqa: B018  (builds the strategy)
        from hypothesis import given
        given(operation.as_strategy())(check)()
    assert failures == []


def test_every_answer_carries_the_security_headers(client, xray):
    for response in (client.get("/"), client.get("/api/model"), client.get("/docs"),
                     client.post("/api/predict", files=[("files", ("a.png", xray))])):
        assert "script-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"


def test_page_and_docs_load_nothing_from_outside(client):
    for path in ("/", "/docs", "/static/app.js"):
        text = client.get(path).text
        assert not re.search(r"""(src|href)=["']?https?:""", text), path
        assert "<script>" not in text  # no inline script: the CSP allows none
    assert "/api/predict" in client.get("/docs").text


def test_public_endpoints_show_no_training_paths(client, tiny_run, tiny_data):
    text = client.get("/api/model").text
    assert str(tiny_data) not in text and str(tiny_run) not in text
    assert "data_root" not in text


def test_other_hosts_and_cross_site_posts_are_refused(client, xray):
    assert client.get("/health", headers={"host": "evil.example"}).status_code == 400
    files = [("files", ("a.png", xray))]
    cross = client.post("/api/predict", files=files, headers={"origin": "http://evil.example"})
    assert cross.status_code == 403
    form = client.post("/api/predict", files=files, headers={"sec-fetch-site": "cross-site"})
    assert form.status_code == 403
    own = client.post("/api/predict", files=files, headers={"origin": "http://testserver"})
    assert own.status_code == 200


def test_too_many_files_or_pixels_in_one_request_are_413(client, xray):
    many = [("files", (f"{i}.png", xray)) for i in range(17)]
    assert client.post("/api/predict", files=many).status_code == 413
    # each under the per-image limit (20 M), together over the request's (40 M)
    blank = png_bytes(np.zeros((4000, 4000), np.uint8))
    three = [("files", (f"{i}.png", blank)) for i in range(3)]
    response = client.post("/api/predict", files=three)
    assert response.status_code == 413 and "48000000 pixels" in response.json()["detail"]


def test_a_full_queue_answers_503_with_retry_after(tiny_run, tmp_path, xray):
    import threading
    from covidxray.run.predictor import Predictor
    predictor = Predictor.load(tiny_run)
    release = threading.Event()
    real = predictor.predict_items

    def slow(*args, **kwargs):
        release.wait(30)
        return real(*args, **kwargs)
    predictor.predict_items = slow
    client = TestClient(create_app(predictor=predictor, run_dir=tiny_run,
                                   settings=settings_for(tmp_path, queue=1)))
    statuses = []
    held = [threading.Thread(target=lambda name=name: statuses.append(client.post(
        "/api/predict", files=[("files", (name, xray))]).status_code)) for name in ("a.png",
                                                                             "b.png")]
    for thread in held:
        thread.start()
        time.sleep(0.5)  # the first request holds the model, the second waits for it
    busy = client.post("/api/predict", files=[("files", ("c.png", xray))])
    release.set()
    for thread in held:
        thread.join(60)
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) > 0
    assert statuses == [200, 200]


def test_films_are_prepared_by_as_many_requests_as_the_model_leaves_cores(tiny_run, tmp_path,
                                                                          xray, monkeypatch):
    """Eight requests at once on three cores: two decode and prepare at the same time, no more
    (more only contend for the cores the model's thread needs), and all are answered."""
    import os
    import threading
    from covidxray.run.predictor import Predictor
    cores = 3
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    predictor = Predictor.load(tiny_run)
    real, lock, now, most = predictor.prepare_or_error, threading.Lock(), [0], [0]

    def counted(*args, **kwargs):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        time.sleep(0.2)  # long enough for the others to arrive
        try:
            return real(*args, **kwargs)
        finally:
            with lock:
                now[0] -= 1
    predictor.prepare_or_error = counted
    client = TestClient(create_app(predictor=predictor, run_dir=tiny_run,
                                   settings=settings_for(tmp_path, queue=8)))
    statuses = []
    threads = [threading.Thread(target=lambda: statuses.append(client.post(
        "/api/predict", files=[("files", ("a.png", xray))]).status_code)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert statuses == [200] * 8
    assert most[0] == cores - 1


@pytest.mark.parametrize("option, value", [("queue", "-1"), ("queue", "0"), ("workers", "-2"),
                                           ("port", "70000")])
def test_settings_out_of_range_are_refused_at_start(option, value, capsys):
    from covidxray.cli import main
    assert main(["serve", "lite0-cxrdev", f"--{option}", value]) == 1
    err = capsys.readouterr().err
    assert f"{option} {value} is out of range" in err and "Traceback" not in err


def test_api_keys_are_required_and_stored_hashed(tiny_run, tmp_path, xray):
    from covidxray.deploy.records import PredictionLog
    from covidxray.deploy.serve.security import new_api_key
    keys = tmp_path / "keys"
    key = new_api_key(keys, "radiology-pilot")
    assert key not in keys.read_text()  # only its hash is kept
    settings = settings_for(tmp_path, api_keys=str(keys))
    client = TestClient(create_app(tiny_run, settings=settings))
    files = [("files", ("a.png", xray))]
    assert client.post("/api/predict", files=files).status_code == 401
    assert client.post("/api/predict", files=files,
                       headers={"x-api-key": "wrong"}).status_code == 401
    assert client.get("/api/model").status_code == 401
    response = client.post("/api/predict", files=files, headers={"x-api-key": key})
    assert response.status_code == 200
    rows = PredictionLog(settings.audit_db).rows()
    assert [r["api_key_id"] for r in rows] == ["radiology-pilot"]


def test_every_served_prediction_is_on_record(client, app, xray):
    import hashlib
    from covidxray.deploy.records import PredictionLog
    response = client.post("/api/predict", files=[("files", ("a.png", xray)),
                                                  ("files", ("bad.png", b"xx"))])
    request_id = response.headers["x-request-id"]
    assert response.json()["request_id"] == request_id
    record = PredictionLog(app.state.record_url).rows()
    mine = [r for r in record if r["request_id"] == request_id]
    assert [r["filename"] for r in mine] == ["a.png", "bad.png"]
    good, bad = mine
    assert good["input_sha256"] == hashlib.sha256(xray).hexdigest()
    assert good["probability"] == pytest.approx(response.json()["results"][0]["probability"])
    assert good["label"] and good["ood"] is False and good["model_id"]
    assert bad["error"] and bad["probability"] is None
    metrics = client.get("/metrics").text
    assert "covidxray_image_errors_total" in metrics and "covidxray_request_seconds" in metrics


@pytest.fixture(scope="module")
def postgres(tmp_path_factory):
    """A PostgreSQL server of Debian's package, started for this test run (as the postgres
    user where the tests run as root); skipped where it is not installed."""
    import getpass
    import glob
    import shutil
    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    initdb = shutil.which("initdb") or (binaries and f"{binaries[-1]}/initdb")
    if not initdb or not Path(initdb).exists():
        pytest.skip("PostgreSQL is not installed (make test installs Debian's package)")
    pytest.importorskip("psycopg")
    import tempfile
    folder = Path(tempfile.mkdtemp(prefix="covidxray-postgres-"))  # reachable by postgres
    run_as = []
    if getpass.getuser() == "root":  # the server refuses to run as root
        shutil.chown(folder, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    bin_dir = Path(initdb).parent
    subprocess.run([*run_as, str(initdb), "-D", str(folder / "data"), "-A", "trust", "-U",
                    "covidxray"], check=True, capture_output=True)
    port = free_port()
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-w", "-l",
                    str(folder / "log"), "-o", f"-p {port} -k {folder} -c listen_addresses="
                    f"127.0.0.1", "start"], check=True, capture_output=True)
    yield f"postgresql+psycopg://covidxray@127.0.0.1:{port}/postgres"
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(folder / "data"), "-m", "fast",
                    "stop"], capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


def test_the_record_goes_to_postgresql(tiny_run, tmp_path, xray, postgres):
    from covidxray.deploy.records import PredictionLog
    client = TestClient(create_app(tiny_run, settings=settings_for(tmp_path,
                                                                   audit_db=postgres)))
    response = client.post("/api/predict", files=[("files", ("a.png", xray))])
    assert response.status_code == 200
    rows = PredictionLog(postgres).rows()
    assert rows[-1]["request_id"] == response.headers["x-request-id"]
    assert rows[-1]["probability"] == pytest.approx(response.json()["results"][0]["probability"])


def test_wrong_api_keys_are_throttled_per_client(tiny_run, tmp_path, xray):
    import time

    from covidxray.deploy.serve.security import FailedKeyThrottle, new_api_key
    keys = tmp_path / "keys"
    key = new_api_key(keys, "pilot")
    client = TestClient(create_app(tiny_run, settings=settings_for(
        tmp_path, api_keys=str(keys), key_failures_allowed=3)))
    wrong = [client.get("/api/model", headers={"x-api-key": f"guess{i}"}).status_code
             for i in range(3)]
    assert wrong == [401, 401, 401]
    assert client.get("/api/model", headers={"x-api-key": "guess3"}).status_code == 401
    locked = client.get("/api/model", headers={"x-api-key": key})  # even the right key waits
    assert locked.status_code == 429 and int(locked.headers["retry-after"]) >= 1
    time.sleep(1.1)
    assert client.get("/api/model", headers={"x-api-key": key}).status_code == 200
    assert client.get("/api/model", headers={"x-api-key": "guess4"}).status_code == 401

    now = [0.0]
    throttle = FailedKeyThrottle(allowed=2, clock=lambda: now[0])
    waits = []
    for _ in range(6):
        throttle.failed("10.0.0.9")
        waits.append(throttle.retry_after("10.0.0.9"))
        now[0] += waits[-1]
    assert waits == [0, 0, 1, 2, 4, 8]  # doubling after the allowed two
    assert throttle.retry_after("10.0.0.8") == 0  # another client is not slowed


def _answer(verdict, prediction_set, label="COVID", positive=True, outline=True, ood=None):
    """An /api/predict answer for the page, with tiny images (``ood``: the gate's reason)."""
    import base64
    import io

    from PIL import Image
    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (200, 200, 200, 255)).save(buffer, "PNG")
    png = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    return {"notice": "Research use only.", "synthetic_data": False, "request_id": "r",
            "results": [{"path": "x.png", "probability": 0.62, "label": label,
                         "positive": positive, "threshold": 0.5, "model_id": "m",
                         "ood": ood is not None, "ood_reason": ood, "image_png": png,
                         "heatmap_png": png, "overlay_png": png, "lungs_found": outline,
                         "lung_heat_share": 0.71 if outline else None,
                         "lung_outline_png": png if outline else None,
                         "prediction_set": prediction_set, "verdict": verdict,
                         "confidence": 0.9, "error": None}]}


@pytest.mark.slow
def test_page_shows_each_verdict_state_distinctly(server, tiny_data, tmp_path):
    """A result, 'uncertain: refer', 'unlike the calibration data' and a film the gate flags
    look different; an uncertain or flagged film shows no COVID / NON-COVID headline (a flagged
    one's score only in small print); the lung outline can be hidden."""
    pytest.importorskip("playwright.sync_api")
    import json
    import shutil

    from browser import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright
    if not shutil.which("chromium"):
        pytest.skip("Debian chromium is not installed")
    image = sorted((tiny_data / "COVID").glob("*.png"))[0]
    states = {"result": _answer("COVID", ["COVID"]),
              "uncertain": _answer("uncertain: refer", ["NON-COVID", "COVID"]),
              "unlike": _answer("unlike the calibration data", [], outline=False),
              "notfrontal": _answer("not a frontal chest X-ray: no verdict", [], label=None,
                                    positive=None, outline=False,
                                    ood="no plausible lungs (one lung field only)")}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 1000})
        for state, answer in states.items():
            page.unroute("**/api/predict*")
            page.route("**/api/predict*", lambda route, _request, body=answer: route.fulfill(
                status=200, content_type="application/json", body=json.dumps(body)))
            page.goto(server + "/")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#result:not([hidden])", timeout=60_000)
            verdict = page.locator("#verdict")
            assert verdict.get_attribute("data-state") == state
            text = verdict.inner_text()
            if state == "result":
                assert "the model calls this image COVID (at 90% confidence)" in text
                assert page.is_visible("#lungs") and "71% of the heat" in page.inner_text(
                    "#lungshare")
                page.uncheck("#showlungs")
                assert not page.is_visible("#lungs")
            elif state == "uncertain":
                assert text.startswith("UNCERTAIN: REFER") and "gives no result" in text
                assert "calls this image" not in text and "COVID" not in text.replace(
                    "NON-COVID", "")
            elif state == "notfrontal":
                assert text.startswith("NOT A FRONTAL CHEST X-RAY: NO VERDICT")
                assert "one lung field only" in text and "calls this image" not in text
                assert not page.is_visible("#prob") and not page.is_visible("#fill")
                assert "research only" in page.inner_text("#researchscore")
            else:
                assert text.startswith("NO RESULT") and not page.is_visible("#lungrow")
                assert "No plausible lungs were found" in page.inner_text("#lungshare")
                assert not page.is_visible("#researchscore")
            page.screenshot(path=str(tmp_path / f"{state}.png"), full_page=True)
        browser.close()


def test_a_record_file_moved_away_is_started_again_and_a_dead_one_answers_503(tiny_run,
                                                                             tmp_path, xray,
                                                                             caplog):
    """Log rotation moves the SQLite record under the running server: the next prediction
    starts a new file where it was (said in the log) and is answered. A record that cannot be
    written at all: /health says so with 503, a prediction is refused with 503 (no answer off
    the record) and the refusal is counted in /metrics."""
    import os

    from covidxray.deploy.records import PredictionLog
    settings = settings_for(tmp_path / "serve")
    record = tmp_path / "serve" / "predictions.sqlite"
    client = TestClient(create_app(tiny_run, settings=settings))
    assert client.post("/api/predict", files=[("files", ("a.png", xray))]).status_code == 200
    os.rename(record, tmp_path / "rotated.sqlite")
    answer = client.post("/api/predict", files=[("files", ("b.png", xray))])
    assert answer.status_code == 200
    assert "was moved or removed: a new one is started" in caplog.text
    assert [r["filename"] for r in PredictionLog(f"sqlite:///{record}").rows()] == ["b.png"]
    assert [r["filename"] for r in PredictionLog(
        f"sqlite:///{tmp_path / 'rotated.sqlite'}").rows()] == ["a.png"]
    assert client.get("/health").json()["status"] == "ok"

    # the record's folder becomes a file: nothing can be written there any more
    os.remove(record)
    os.rmdir(record.parent)
    record.parent.write_text("in the way")
    health = client.get("/health")
    assert health.status_code == 503 and "cannot be written" in health.json()["record"]
    refused = client.post("/api/predict", files=[("files", ("c.png", xray))])
    assert refused.status_code == 503 and "not on record" in refused.json()["detail"]
    assert 'covidxray_requests_total{status="503"} 1.0' in client.get("/metrics").text
def _decode(data_url_or_png: str | bytes) -> np.ndarray:
    """RGB floats in [0, 1] from a data: URL or PNG bytes."""
    import base64
    raw = data_url_or_png
    if isinstance(raw, str):
        raw = base64.b64decode(raw.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"), np.float64) / 255


def _panel_against_overlay(page, overlay_png: str) -> tuple[float, float, float]:
    """The Grad-CAM panel as Chromium draws it, against the API's overlay: (mean absolute
    difference, share of near-black pixels in the panel, the same in the overlay), both
    brought to the overlay's size."""
    page.wait_for_function("['base', 'heat', 'lungs'].every(id => { const i = "
                           "document.getElementById(id); return i.hidden || "
                           "(i.complete && i.naturalWidth > 0); })")
    reference = _decode(overlay_png)
    shot = Image.open(io.BytesIO(page.locator("#gradcam").screenshot())).convert("RGB")
    panel = np.asarray(shot.resize(reference.shape[1::-1], Image.Resampling.BOX),
                       np.float64) / 255
    return float(np.abs(panel - reference).mean()), _dark(panel), _dark(reference)


def _dark(rgb: np.ndarray) -> float:
    """The share of near-black pixels."""
    return float((rgb.max(-1) < 0.06).mean())


@pytest.mark.slow
def test_gradcam_panel_draws_what_the_api_overlays(server, tiny_data, tmp_path):
    """The page's stacked layers (X-ray, heat map at the default opacity, lung outline) look
    like the API's ``overlay_png``: not a black square with the outline on it."""
    pytest.importorskip("playwright.sync_api")
    import json
    import shutil

    from browser import CHROMIUM, CHROMIUM_ARGS
    from playwright.sync_api import sync_playwright

    from covidxray.deploy.serve.app import _heatmap_rgba, _outline_rgba, _png
    from covidxray.evaluation.explain import overlay
    if not shutil.which("chromium"):
        pytest.skip("Debian chromium is not installed")
    image = sorted((tiny_data / "COVID").glob("*.png"))[0]

    # an answer made as the API makes one, always with an outline (the tiny run has no lung
    # segmenter): a mid-grey film, heat in one place only, a transparent outline layer
    rows, cols = np.mgrid[0:256, 0:200]
    gray = (0.35 + 0.4 * (cols / 199)).astype(np.float32)
    heat = np.exp(-((rows - 128) ** 2 + (cols - 100) ** 2) / (2 * 40 ** 2)).astype(np.float32)
    outline = np.zeros(gray.shape, bool)
    outline[40:44, 30:170] = outline[200:204, 30:170] = True
    made = _answer("COVID", ["COVID"])
    made["results"][0].update(
        image_png=_png(np.rint(gray * 255).astype(np.uint8)), heatmap_png=_png(_heatmap_rgba(heat)),
        overlay_png=_png(overlay(gray, heat, outline=outline)),
        lung_outline_png=_png(_outline_rgba(outline)))

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 1000}, device_scale_factor=1)
        page.route("**/api/predict*", lambda route, _request: route.fulfill(
            status=200, content_type="application/json", body=json.dumps(made)))
        page.goto(server + "/")
        assert page.input_value("#opacity") == "40"  # the API's overlay blends at 0.4
        page.set_input_files("#file", str(image))
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        assert page.is_visible("#lungs")
        difference, dark, dark_overlay = _panel_against_overlay(page, made["results"][0]["overlay_png"])
        page.locator("#gradcam").screenshot(path=str(tmp_path / "made.png"))
        assert dark < 0.05 and dark_overlay < 0.05, (dark, dark_overlay)
        assert difference < 0.03, difference
        page.uncheck("#showlungs")  # the toggle still works, and the layers stay see-through
        assert not page.is_visible("#lungs")
        without, _, _ = _panel_against_overlay(
            page, _png(overlay(gray, heat)))
        assert without < 0.03, without

        # the real server's answer for a real (synthetic) film
        page.unroute("**/api/predict*")
        page.goto(server + "/")
        with page.expect_response("**/api/predict*", timeout=60_000) as answer:
            page.set_input_files("#file", str(image))
        result = answer.value.json()["results"][0]
        assert result["overlay_png"] is None  # the page layers the images itself
        page.wait_for_selector("#result:not([hidden])", timeout=60_000)
        import httpx
        burnt = httpx.post(server + "/api/predict?overlay=1", timeout=60,
                           files=[("files", (image.name, image.read_bytes()))])
        difference, dark, dark_overlay = _panel_against_overlay(
            page, burnt.json()["results"][0]["overlay_png"])
        page.locator("#gradcam").screenshot(path=str(tmp_path / "served.png"))
        assert dark <= dark_overlay + 0.05 and dark < 0.5, (dark, dark_overlay)
        assert difference < 0.04, difference
        browser.close()
