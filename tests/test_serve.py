"""The web app: API, input safety, a real server on loopback, the page in a browser, and
schemathesis against the OpenAPI schema."""

import io
import socket
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from browser import open_page  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

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


@pytest.fixture(scope="module")
def app(tiny_run):
    return create_app(tiny_run, max_upload_bytes=1_000_000, max_pixels=20_000_000)


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
    assert card["metadata"]["positive_class"] == "COVID"
    assert client.get("/openapi.json").json()["paths"]["/api/predict"]


def test_predict_several_images(client, xray):
    photo = (np.random.default_rng(0).random((300, 400, 3)) * 255).astype(np.uint8)
    response = client.post("/api/predict", files=[
        ("files", ("a.png", xray, "image/png")), ("files", ("photo.png", png_bytes(photo)))])
    assert response.status_code == 200
    first, second = response.json()["results"]
    assert 0 <= first["probability"] <= 1 and first["label"] in ("COVID", "NON-COVID")
    assert first["ood"]["flag"] is False and first["model_id"]
    for key in ("image_png", "heatmap_png", "overlay_png"):
        assert first[key].startswith("data:image/png;base64,")
    assert second["ood"]["flag"] is True and "not like a frontal chest X-ray" in \
        second["ood"]["reason"]
    assert response.json()["synthetic_data"] is True


def test_dicom_upload(client, tmp_path):
    from test_imageio import write_dicom
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
    response = client.post("/api/predict", files=[("files", ("big.png", b"\0" * 1_500_000))])
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
    assert response.json()["results"][0]["filename"] == "evil.png"
    assert list(tmp_path.rglob("*")) == [] and not (tmp_path.parent / "evil.png").exists()


def test_missing_files_field_is_422(client):
    assert client.post("/api/predict").status_code == 422


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_run):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "covidxray", "serve", str(tiny_run),
                                "--port", str(port)], stdout=subprocess.PIPE,
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
    response = httpx.post(server + "/api/predict", files=[("files", ("a.png", xray))],
                          timeout=60)
    assert response.status_code == 200
    assert httpx.get(server + "/").text.count("Not a medical device") == 1


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
        assert "the model calls this image" in page.inner_text("#verdict")
        page.wait_for_function("document.getElementById('heat').naturalWidth > 0")
        assert "SYNTHETIC" in page.inner_text("#model")
        page.fill("#opacity", "20")
        page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
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
