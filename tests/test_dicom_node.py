"""The DICOM node: C-ECHO and C-STORE by pynetdicom and DCMTK clients, results as DICOM in the
film's study, the AE allow-list, TLS, hostile instances; and a round trip with a real PACS
(Orthanc), which sends a film to the node and gets the Structured Report and the heat map
back."""

import io
import json
import shutil
import socket
import subprocess
import time

import numpy as np
import pytest
from conftest import DICOM_DIR

pynetdicom = pytest.importorskip("pynetdicom")
pytest.importorskip("highdicom")

import covidxray  # noqa: E402
from covidxray.deploy.dicom.results import probability_of  # noqa: E402

VERIFICATION = "1.2.840.10008.1.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chest_film(tmp_path):
    """A real chest DICOM where the shared data has one, else a drawn film as CR."""
    real = DICOM_DIR / "cxr_pa_jpeg_baseline.dcm"
    if real.is_file():
        return real
    from covidxray.data.synthetic import synthetic_radiograph
    from test_decode import write_dicom
    film = synthetic_radiograph(np.random.default_rng(0), 256)
    return write_dicom(tmp_path / "film.dcm", np.rint(film * 4095).astype(np.uint16),
                       StudyInstanceUID="1.2.826.0.1.3680043.8.498.1",
                       SeriesInstanceUID="1.2.826.0.1.3680043.8.498.2", BodyPartExamined="CHEST")


def client(ae_title="TESTSCU", films=()):
    """A pynetdicom SCU asking for Verification, CR storage and each film's own class and
    transfer syntax."""
    from pynetdicom import AE
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(VERIFICATION)
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.1.2.1")
    for film in films:
        ae.add_requested_context(film.SOPClassUID, film.file_meta.TransferSyntaxUID)
    return ae


@pytest.fixture
def node(tiny_run, tmp_path):
    running = covidxray.api.dicom_node(
        tiny_run, block=False, port=0, out=str(tmp_path / "out"),
        allowed_aes=("TESTSCU", "STORESCU"),
        audit_db=f"sqlite:///{tmp_path / 'record.sqlite'}")
    yield running
    running.stop()


@pytest.mark.slow
def test_a_film_stored_comes_back_as_a_report_and_a_heat_map(node, tiny_run, tmp_path):
    import pydicom

    from covidxray.deploy.records import PredictionLog
    film = chest_film(tmp_path)
    source = pydicom.dcmread(film)
    assoc = client(films=[source]).associate("127.0.0.1", node.port, ae_title="COVIDXRAY")
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0
    assert assoc.send_c_store(source).Status == 0
    assoc.release()
    written = sorted((tmp_path / "out" / source.StudyInstanceUID).glob("*.dcm"))
    by_modality = {pydicom.dcmread(p).Modality: pydicom.dcmread(p) for p in written}
    report, capture = by_modality["SR"], by_modality["OT"]
    expected = covidxray.predict(tiny_run, [film])[0].probability
    assert probability_of(report) == pytest.approx(expected, abs=1e-6)
    for made in (report, capture):
        assert made.StudyInstanceUID == source.StudyInstanceUID
        assert made.PatientID == source.PatientID
        assert made.SeriesInstanceUID != source.SeriesInstanceUID
    text = json.dumps([str(item.get("TextValue", "")) for item in report.ContentSequence])
    assert "Not a medical device" in text and capture.BurnedInAnnotation == "YES"
    assert report.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
        .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    (row,) = PredictionLog(node.records.url).rows()
    assert (row["channel"], row["sop_instance_uid"], row["calling_ae"]) == (
        "dicom", source.SOPInstanceUID, "TESTSCU")

    # a sender that leaves out Type 2 patient and study attributes still gets its results
    from pydicom.uid import generate_uid
    sparse = pydicom.dcmread(film)
    for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                    "ReferringPhysicianName", "AccessionNumber", "StudyID"):
        if keyword in sparse:
            delattr(sparse, keyword)
    sparse.SOPInstanceUID = sparse.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assoc = client(films=[sparse]).associate("127.0.0.1", node.port, ae_title="COVIDXRAY")
    assert assoc.send_c_store(sparse).Status == 0
    assoc.release()
    assert len(list((tmp_path / "out" / source.StudyInstanceUID).glob("SR-*.dcm"))) == 2


def test_an_unknown_calling_ae_is_rejected_and_a_hostile_instance_refused(node, tmp_path):
    from pydicom.dataset import Dataset
    assert not client("INTRUDER").associate("127.0.0.1", node.port,
                                            ae_title="COVIDXRAY").is_established
    assoc = client().associate("127.0.0.1", node.port, ae_title="COVIDXRAY")
    bomb = Dataset()  # a header that declares 300 frames of 1000 x 1000, no real pixels
    bomb.SOPClassUID, bomb.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", "1.2.3.4.5"
    bomb.Rows = bomb.Columns = 1000
    bomb.NumberOfFrames, bomb.SamplesPerPixel, bomb.BitsAllocated = 300, 1, 8
    bomb.BitsStored, bomb.HighBit, bomb.PixelRepresentation = 8, 7, 0
    bomb.PhotometricInterpretation = "MONOCHROME2"
    bomb.PixelData = b"\0" * 1000
    from pydicom.dataset import FileMetaDataset
    bomb.file_meta = FileMetaDataset()
    bomb.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    status = assoc.send_c_store(bomb)
    assert status.Status == 0xC000
    assert assoc.send_c_echo().Status == 0  # and it goes on serving
    assoc.release()


@pytest.mark.slow
def test_tls_is_the_only_way_in_when_it_is_on(tiny_run, tmp_path):
    import ssl
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    running = covidxray.api.dicom_node(tiny_run, block=False, port=0, tls_cert=str(cert),
                                       tls_key=str(key), timeout_s=5,
                                       audit_db=f"sqlite:///{tmp_path / 'r.sqlite'}")
    try:
        plain = client().associate("127.0.0.1", running.port, ae_title="COVIDXRAY")
        assert not plain.is_established
        context = ssl.create_default_context(cafile=str(cert))
        secure = client().associate("127.0.0.1", running.port, ae_title="COVIDXRAY",
                                    tls_args=(context, "127.0.0.1"))
        assert secure.is_established and secure.send_c_echo().Status == 0
        secure.release()
    finally:
        running.stop()


def orthanc_config(folder, http_port, dicom_port, node_port):
    return {"Name": "covidxray-test", "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"), "HttpPort": http_port,
            "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
            "DicomModalities": {"covidxray": ["STORESCU", "127.0.0.1", node_port]},
            "Plugins": [], "StableAge": 1}


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("Orthanc") or not shutil.which("storescu"),
                    reason="Orthanc and DCMTK are not installed (make test installs them)")
def test_round_trip_with_a_real_pacs(tiny_run, tmp_path):
    """storescu puts a chest film in Orthanc; Orthanc sends it to the node (its REST API, as a
    routing rule would); the node sends the SR and the heat map back to Orthanc, into the
    film's study; the SR's P(COVID) is the one 'covidxray predict' gives."""
    import httpx
    import pydicom
    http_port, dicom_port = free_port(), free_port()
    node_port = free_port()
    (tmp_path / "orthanc.json").write_text(json.dumps(orthanc_config(
        tmp_path, http_port, dicom_port, node_port)))
    orthanc = subprocess.Popen(["Orthanc", str(tmp_path / "orthanc.json")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    running = covidxray.api.dicom_node(tiny_run, block=False, port=node_port,
                                       ae_title="STORESCU", allowed_aes=("ORTHANC",),
                                       send_to=f"ORTHANC@127.0.0.1:{dicom_port}",
                                       outbox=str(tmp_path / "outbox"),
                                       audit_db=f"sqlite:///{tmp_path / 'r.sqlite'}")
    rest = f"http://127.0.0.1:{http_port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(rest + "/system", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        assert subprocess.run(["echoscu", "-aec", "ORTHANC", "127.0.0.1", str(dicom_port)],
                              capture_output=True).returncode == 0
        assert subprocess.run(["echoscu", "-aet", "ORTHANC", "-aec", "STORESCU", "127.0.0.1",
                               str(node_port)], capture_output=True).returncode == 0
        film = chest_film(tmp_path)
        # the film's own transfer syntax (the real one is JPEG baseline), and the uncompressed ones
        syntax = ["-xy"] if pydicom.dcmread(film).file_meta.TransferSyntaxUID == \
            "1.2.840.10008.1.2.4.50" else []
        stored = subprocess.run(["storescu", *syntax, "-aec", "ORTHANC", "127.0.0.1",
                                 str(dicom_port), str(film)], capture_output=True, text=True)
        assert stored.returncode == 0, stored.stderr
        (instance,) = httpx.get(rest + "/instances").json()
        sent = httpx.post(rest + "/modalities/covidxray/store", json=[instance], timeout=120)
        assert sent.status_code == 200, sent.text
        for _ in range(120):
            instances = httpx.get(rest + "/instances").json()
            if len(instances) >= 3:
                break
            time.sleep(0.5)
        assert len(instances) == 3, instances
        objects = [pydicom.dcmread(io.BytesIO(httpx.get(f"{rest}/instances/{i}/file").content))
                   for i in instances]
        source = pydicom.dcmread(film)
        report = next(o for o in objects if o.Modality == "SR")
        capture = next(o for o in objects if o.Modality == "OT")
        assert {o.StudyInstanceUID for o in objects} == {source.StudyInstanceUID}
        expected = covidxray.predict(tiny_run, [film])[0].probability
        assert probability_of(report) == pytest.approx(expected, abs=1e-6)
        assert capture.BurnedInAnnotation == "YES"
        truncated = tmp_path / "truncated.dcm"
        truncated.write_bytes(film.read_bytes()[:2000])
        subprocess.run(["storescu", "-aet", "ORTHANC", "-aec", "STORESCU", "-nh", "127.0.0.1",
                        str(node_port), str(truncated)], capture_output=True)
        assert subprocess.run(["echoscu", "-aet", "ORTHANC", "-aec", "STORESCU", "127.0.0.1",
                               str(node_port)], capture_output=True).returncode == 0
    finally:
        running.stop()
        orthanc.terminate()
        orthanc.wait(timeout=30)


@pytest.mark.slow
def test_uids_that_are_paths_are_refused_and_nothing_leaves_out(node, tmp_path, caplog):
    """A StudyInstanceUID of '../../x' or '/tmp/x' gets a named refusal: no file is written
    anywhere, inside --out or out of it; bad dates and a missing study are scored, with what
    can be made made and the reason logged."""
    import pydicom
    from pydicom.uid import generate_uid
    film = chest_film(tmp_path)
    escaped = tmp_path / "escaped"
    for study in (f"../../../../{escaped}", str(escaped / "abs")):
        hostile = pydicom.dcmread(film)
        hostile.StudyInstanceUID = study
        hostile.SOPInstanceUID = hostile.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        assoc = client(films=[hostile]).associate("127.0.0.1", node.port, ae_title="COVIDXRAY")
        assert assoc.send_c_store(hostile).Status == 0xC000
        assoc.release()
    assert "StudyInstanceUID '../../../../" in caplog.text and "is not a DICOM UID" in caplog.text
    assert not escaped.exists() and not list((tmp_path / "out").rglob("*.dcm"))

    odd = pydicom.dcmread(film)
    odd.StudyDate, odd.StudyTime, odd.PatientBirthDate = "notadate", "25:99", "19xx0101"
    odd.SOPInstanceUID = odd.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    no_study = pydicom.dcmread(film)
    del no_study.StudyInstanceUID
    no_study.SOPInstanceUID = no_study.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    assoc = client(films=[odd]).associate("127.0.0.1", node.port, ae_title="COVIDXRAY")
    assert assoc.send_c_store(odd).Status == 0
    assert assoc.send_c_store(no_study).Status == 0
    assoc.release()
    made = [pydicom.dcmread(p) for p in (tmp_path / "out").rglob("*.dcm")]
    assert len(made) == 2 and {m.StudyDate for m in made} == {""}
    assert "StudyDate 'notadate' is not a valid DA" in caplog.text
    assert "the film lacks StudyInstanceUID" in caplog.text


def test_a_node_whose_out_folder_cannot_be_written_does_not_start(tiny_run, readonly_folder,
                                                                  tmp_path):
    """Refused at start-up, naming the folder: no film is taken, scored and then lost."""
    import sys
    done = subprocess.run(
        [sys.executable, "-m", "covidxray", "dicom-node", str(tiny_run), "--port", "0",
         "--out", str(readonly_folder / "results"),
         "--audit-db", f"sqlite:///{tmp_path / 'record.sqlite'}"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert f"{readonly_folder / 'results'} (--out) cannot be written" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_flagged_film_gets_no_verdict_in_the_report(tmp_path):
    """The SR of a film the gate flags says so and makes no call; its score stays as data."""
    import pydicom

    from covidxray.deploy.dicom.results import prepared_source, result_objects
    from covidxray.run.conformal import NOT_FRONTAL
    from covidxray.run.record import Prediction
    source = pydicom.dcmread(chest_film(tmp_path), stop_before_pixels=True)
    prepared_source(source)
    flagged = Prediction(path="x", probability=0.91, label=None, positive=None, ood=True,
                         ood_reason="not like a frontal chest X-ray", verdict=NOT_FRONTAL,
                         prediction_set=[])
    report, _ = result_objects(source, flagged, _metadata(),
                               np.zeros((64, 64, 3), np.uint8))
    codes = [item.ConceptCodeSequence[0].CodeMeaning for item in report.ContentSequence
             if "ConceptCodeSequence" in item]
    texts = [str(item.get("TextValue", "")) for item in report.ContentSequence]
    assert codes == [NOT_FRONTAL] and any(NOT_FRONTAL in t for t in texts)
    assert probability_of(report) == pytest.approx(0.91)


def _metadata():
    from covidxray.config import Preprocessing
    from covidxray.run.metadata import RunMetadata
    return RunMetadata(class_names=["COVID", "NORMAL"], positive_class="COVID",
                       preprocessing=Preprocessing(64), backbone="test", weights="none",
                       threshold=0.5, threshold_method="youden", model_id="test",
                       data_fingerprint="", created="", covidxray_version="", backend="",
                       confidence=0.9)


def node_process(run, port, pacs_port, outbox, tmp_path, name):
    """``covidxray dicom-node`` as its own process, answering C-ECHO."""
    import sys
    log_file = open(tmp_path / f"{name}.log", "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "covidxray", "dicom-node", str(run), "--port", str(port),
         "--allow-ae", "TESTSCU", "--send-to", f"ORTHANC@127.0.0.1:{pacs_port}",
         "--outbox", str(outbox), "--timeout", "5",
         "--audit-db", f"sqlite:///{tmp_path / 'record.sqlite'}"],
        stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the node stopped: {(tmp_path / f'{name}.log').read_text()[-2000:]}")
        assoc = client().associate("127.0.0.1", port, ae_title="COVIDXRAY")
        if assoc.is_established:
            answered = assoc.send_c_echo().Status == 0
            assoc.release()
            if answered:
                return process
        time.sleep(0.5)
    process.kill()
    pytest.fail("the node did not start")


def wait_for_orthanc(rest: str, seconds: float = 60) -> None:
    import httpx
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if httpx.get(rest + "/system", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail("Orthanc did not start")


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("Orthanc"), reason="Orthanc is not installed (make test "
                                                        "installs it)")
def test_results_acknowledged_while_the_pacs_is_down_survive_a_kill(tiny_run, tmp_path):
    """The PACS is down: the film is acknowledged, its results wait on the disk; the node is
    killed (SIGKILL); the PACS comes up and a new node delivers them, each once."""
    import os
    import signal
    import sys

    import httpx
    import pydicom
    http_port, pacs_port, node_port = free_port(), free_port(), free_port()
    outbox, film = tmp_path / "outbox", chest_film(tmp_path)
    source = pydicom.dcmread(film)
    node, orthanc = node_process(tiny_run, node_port, pacs_port, outbox, tmp_path, "first"), None
    try:
        assoc = client(films=[source]).associate("127.0.0.1", node_port, ae_title="COVIDXRAY")
        assert assoc.send_c_store(source).Status == 0
        assoc.release()
        os.killpg(node.pid, signal.SIGKILL)
        node.wait()
        assert len(list(outbox.glob("*.dcm"))) == 2  # the SR and the heat map, kept
        status = subprocess.run([sys.executable, "-m", "covidxray", "dicom-node", str(tiny_run),
                                 "--status", "--outbox", str(outbox)], capture_output=True,
                                text=True)
        assert status.returncode == 0 and "2 results wait" in status.stdout
        (tmp_path / "orthanc.json").write_text(json.dumps(
            orthanc_config(tmp_path, http_port, pacs_port, node_port)))
        orthanc = subprocess.Popen(["Orthanc", str(tmp_path / "orthanc.json")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        rest = f"http://127.0.0.1:{http_port}"
        wait_for_orthanc(rest)
        node = node_process(tiny_run, node_port, pacs_port, outbox, tmp_path, "second")
        deadline = time.monotonic() + 90
        while (list(outbox.glob("*.dcm")) or len(httpx.get(rest + "/instances").json()) < 2) \
                and time.monotonic() < deadline:
            time.sleep(0.5)
        instances = httpx.get(rest + "/instances").json()
        assert len(instances) == 2 and not list(outbox.glob("*.dcm"))
        objects = [pydicom.dcmread(io.BytesIO(httpx.get(f"{rest}/instances/{i}/file").content))
                   for i in instances]
        assert sorted(o.Modality for o in objects) == ["OT", "SR"]
        assert {o.StudyInstanceUID for o in objects} == {source.StudyInstanceUID}
    finally:
        for process in (node, orthanc):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(timeout=30)
