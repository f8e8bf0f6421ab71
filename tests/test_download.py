"""``covidxray data download`` through the real kagglehub, with no network: a data set the
test makes is put into kagglehub's own cache with kagglehub's own functions, as a download
would have left it."""

import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from covidxray.cli import main
from covidxray.data.dataset import discover
from covidxray.fileutil import file_sha256

kagglehub = pytest.importorskip("kagglehub")
HANDLE = "akhilkasare/covid19-chest-xray-detection"


@pytest.fixture
def offline(monkeypatch):
    """No connection can be opened, as on a machine without internet."""
    def refuse(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "no network in this test")
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture
def kaggle_cache(tmp_path, monkeypatch):
    """kagglehub's cache holding version 3 of the data set, in the Kaggle layout with the
    archive's wrapper folder."""
    from kagglehub.cache import Cache, get_cached_path
    from kagglehub.handle import parse_dataset_handle
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    handle = parse_dataset_handle(f"{HANDLE}/versions/3")
    folder = Path(get_cached_path(handle))
    rng = np.random.default_rng(0)
    for split in ("Train", "Test"):
        for label in ("Covid", "NON-COVID"):
            images = folder / "Covid19-dataset" / split / label
            images.mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 256, (40, 40), dtype=np.uint8)
                Image.fromarray(pixels).save(images / f"{split}_{label}_{i}.png")
    Cache().mark_as_complete(handle)
    return folder


def test_download_from_kagglehubs_cache_gives_a_folder_train_reads(kaggle_cache, tmp_path,
                                                                   offline, capsys):
    assert main(["data", "download", f"{HANDLE}/versions/3", "--out",
                 str(tmp_path / "data")]) == 0
    folder = tmp_path / "data" / "covid19-chest-xray-detection"
    record = json.loads((folder / "download.json").read_text())
    assert record["handle"] == f"{HANDLE}/versions/3" and record["version"] == "3"
    assert len(record["files"]) == 12
    for name, facts in record["files"].items():
        assert file_sha256(folder / name) == facts["sha256"]
        assert (folder / name).stat().st_size == facts["bytes"]
    root = folder / "Covid19-dataset"
    assert f"covidxray train {root}" in capsys.readouterr().out
    dataset = discover(root)
    assert len(dataset.records) == 12
    assert {r.split for r in dataset.records} == {"train", "test"}
    assert {r.label for r in dataset.records} == {"Covid", "NON-COVID"}
    assert not list((tmp_path / "data").glob(".*partial"))

    # a second download into the same place is refused, the first kept
    assert main(["data", "download", f"{HANDLE}/versions/3", "--out",
                 str(tmp_path / "data")]) == 1
    assert "already exists" in capsys.readouterr().err
    assert (folder / "download.json").is_file()


def test_offline_download_fails_in_seconds_saying_what_to_do(tmp_path, offline,
                                                             monkeypatch, capsys):
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
    started = time.monotonic()
    assert main(["data", "download", "--out", str(tmp_path / "data")]) == 1
    assert time.monotonic() - started < 10
    error = capsys.readouterr().err
    assert HANDLE in error and "cannot reach Kaggle" in error
    assert "versions/N" in error
    assert not (tmp_path / "data" / "covid19-chest-xray-detection").exists()
