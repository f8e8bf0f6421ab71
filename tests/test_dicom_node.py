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
    from test_imageio import write_dicom
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

    from covidxray.deploy.serve.records import PredictionLog
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
