"""``covidxray dicom-node RUN``: a DICOM application entity (pynetdicom) on the hospital's
network, beside the PACS.

It answers C-ECHO and takes C-STORE of the storage classes a chest film arrives as (CR, DX for
presentation and for processing, Secondary Capture, single- and multi-frame), in the transfer
syntaxes the reader decodes. Each instance is read through the same reader and budgets as an
upload to the server (the whole file is sized from its header before any pixel is decoded,
every frame counted) and scored by the run's ``Predictor``; the result is put on the server's
prediction record (with the SOP Instance UID and the calling AE title), and a Structured Report
and a Secondary Capture of the heat map (``deploy.dicom.results``) are written to a folder
and/or sent with C-STORE to a destination (``--send-to AE@host:port``), in the film's study.

Safe on the network: it listens on loopback unless told otherwise; only the calling AE titles
and host addresses allowed may associate; associations, PDU size, instances per association,
instance size and every timeout are bounded; TLS (Python's ``ssl``) is optional and, when on,
the only way in. A malformed or hostile instance gets a failure status and one named line in
the log, and the node goes on serving. Counters and timings are exposed to Prometheus.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from covidxray.config import DicomNodeConfig
from covidxray.deploy.dicom.outbox import Outbox
from covidxray.deploy.memory import limit_arenas, release_free_memory
from covidxray.deploy.dicom.results import bad_uid, missing_for_results
from covidxray.errors import UserError
from covidxray.fileutil import atomic_path
from covidxray.run.folder import RunFolder

log = logging.getLogger(__name__)

# CR, DX for presentation, DX for processing, Secondary Capture (and its multi-frame kinds)
STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word Secondary Capture Image Storage",
}
# what covidxray.pixels.decode decodes: uncompressed, deflated, JPEG baseline and extended,
# JPEG Lossless, JPEG-LS, JPEG 2000, RLE
TRANSFER_SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
                     "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
                     "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
                     "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
                     "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"]
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700  # instances per association used up, or too large
CANNOT_UNDERSTAND = 0xC000  # not an image this reader can use


def parse_destination(value: str) -> tuple[str, str, int]:
    """``AE@host:port`` -> (AE title, host, port)."""
    title, at, address = value.partition("@")
    host, colon, port = address.rpartition(":")
    if not (at and colon and title and host and port.isdigit()):
        raise UserError(f"--send-to {value!r}: expected AE@host:port, e.g. ORTHANC@pacs:4242")
    return title, host, int(port)


def tls_context(config: DicomNodeConfig):
    """The server's ``ssl.SSLContext`` (None without a certificate)."""
    if not config.tls_cert:
        return None
    import ssl
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_ca:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(config.tls_ca)
    return context


@dataclass
class NodeMetrics:
    """Prometheus counters of the node (its own registry; served with ``metrics_port``)."""

    registry: object = None
    instances: object = None
    results_sent: object = None
    seconds: object = None

    @classmethod
    def create(cls) -> "NodeMetrics":
        from prometheus_client import CollectorRegistry, Counter, Histogram
        registry = CollectorRegistry()
        return cls(registry,
                   Counter("covidxray_dicom_instances_total", "Instances received, by outcome",
                           ["outcome"], registry=registry),
                   Counter("covidxray_dicom_results_sent_total", "SR and SC sent, by outcome",
                           ["outcome"], registry=registry),
                   Histogram("covidxray_dicom_instance_seconds", "Time to score an instance",
                             registry=registry, buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)))


@dataclass
class DicomNode:
    """A running node: its pynetdicom server, its outbox, and what it keeps count of."""

    config: DicomNodeConfig
    predictor: object
    records: object
    metrics: NodeMetrics
    server: object = None
    outbox: Outbox | None = None  # with send_to: what waits for the PACS
    per_association: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)  # one model pass at a time

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
        if self.outbox is not None:
            self.outbox.stop()

    # --- handlers -----------------------------------------------------------------------

    def on_echo(self, event) -> int:
        return SUCCESS

    def on_release(self, event) -> None:
        self.per_association.pop(id(event.assoc), None)

    def on_store(self, event) -> int:
        try:
            return self._store(event)
        finally:  # a film's arrays, freed, go back to the system: the node's memory stays flat
            release_free_memory()

    def _store(self, event) -> int:
        assoc = event.assoc
        calling = assoc.requestor.ae_title.strip() if isinstance(
            assoc.requestor.ae_title, str) else str(assoc.requestor.ae_title).strip()
        peer = f"{calling}@{assoc.requestor.address}"
        count = self.per_association.get(id(assoc), 0) + 1
        self.per_association[id(assoc)] = count
        uid = str(getattr(event.request, "AffectedSOPInstanceUID", "") or "unknown")
        if count > self.config.max_instances:
            return self._refuse(peer, uid, OUT_OF_RESOURCES,
                                f"more than {self.config.max_instances} instances in one "
                                f"association")
        started = time.monotonic()
        try:
            data = self._received(event)
        except ValueError as error:
            return self._refuse(peer, uid, OUT_OF_RESOURCES, str(error))
        source = _header(data)
        problem = None if source is None else bad_uid(source)
        if problem:  # nothing named from it may reach the file system or the PACS
            return self._refuse(peer, uid, CANNOT_UNDERSTAND, problem)
        with self.lock:
            prediction = self.predictor.predict_many([data], [uid], heatmaps=True,
                                                     max_pixels=self.config.max_pixels)[0]
        request_id = uuid.uuid4().hex
        from covidxray.deploy.records import RecordUnavailable, Served
        try:
            self.records.record([Served(prediction, request_id,
                                        self.predictor.metadata.model_id,
                                        hashlib.sha256(data).hexdigest(), None,
                                        channel="dicom", sop_instance_uid=uid,
                                        calling_ae=calling)])
        except RecordUnavailable as error:  # not on record: not acknowledged either
            return self._refuse(peer, uid, OUT_OF_RESOURCES, str(error))
        self.metrics.seconds.observe(time.monotonic() - started)
        if prediction.error:
            return self._refuse(peer, uid, CANNOT_UNDERSTAND, prediction.error)
        self.metrics.instances.labels("scored").inc()
        log.info("C-STORE from %s: %s scored P(COVID)=%.4f %s", peer, uid,
                 prediction.probability, prediction.verdict or prediction.label)
        missing = missing_for_results(source)
        if missing:  # scored and recorded: what cannot be made is said
            log.warning("C-STORE from %s: %s scored and recorded, but no report or heat map "
                        "was made: the film lacks %s, without which they cannot join its "
                        "study", peer, uid, " and ".join(missing))
            return SUCCESS
        try:
            results = self._results(source, prediction, peer, uid)
        except Exception as error:  # a header the result objects cannot be built from
            return self._refuse(peer, uid, CANNOT_UNDERSTAND,
                                f"scored, but no result could be made from its header "
                                f"({type(error).__name__}: {error})")
        try:
            self._deliver(results)
        except OSError as error:  # not kept: not acknowledged, so the sender tries again
            return self._refuse(peer, uid, OUT_OF_RESOURCES,
                                f"scored, but its results could not be kept "
                                f"({error.strerror or error})")
        return SUCCESS

    def _refuse(self, peer: str, uid: str, status: int, reason: str) -> int:
        self.metrics.instances.labels("refused").inc()
        log.warning("C-STORE from %s: %s refused (status 0x%04X): %s", peer, uid, status,
                    reason)
        return status

    def _received(self, event) -> bytes:
        """The instance as a DICOM file's bytes, refused over the size limit (read from the
        temporary file pynetdicom streams it to, not kept in memory on the way)."""
        limit = int(self.config.max_instance_mb * 1024 * 1024)
        path = getattr(event, "dataset_path", None)
        if path is not None:
            size = os.path.getsize(path)
            if size > limit:
                raise ValueError(f"instance of {size} bytes is over the limit of {limit}")
            return Path(path).read_bytes()
        data = event.encoded_dataset(include_meta=True)
        if len(data) > limit:
            raise ValueError(f"instance of {len(data)} bytes is over the limit of {limit}")
        return data

    def _results(self, source, prediction, peer: str, uid: str) -> list:
        from covidxray.deploy.dicom.results import prepared_source, result_objects
        from covidxray.evaluation.explain import explanation_of
        for note in prepared_source(source):
            log.warning("C-STORE from %s: %s: %s", peer, uid, note)
        return result_objects(source, prediction, self.predictor.metadata,
                              explanation_of(prediction).overlay)

    def _deliver(self, results: list) -> None:
        """The results as files under ``out`` (one folder per study, named by its checked
        UID) and into the outbox for the PACS: both on the disk before the C-STORE is
        acknowledged."""
        if self.config.out:
            out = Path(self.config.out).resolve()
            for dataset in results:
                target = (out / str(dataset.StudyInstanceUID) /
                          f"{dataset.Modality}-{dataset.SOPInstanceUID}.dcm").resolve()
                if out not in target.parents:  # a UID is digits and dots: never, but checked
                    raise OSError(f"{target} would lie outside {out}")
                with atomic_path(target, suffix=".dcm") as tmp:
                    dataset.save_as(tmp, enforce_file_format=True)
        if self.outbox is not None:
            self.outbox.put(results)

    def _send(self, paths: list[Path]) -> list[Path]:
        """C-STORE of waiting results to the destination, in one association of this node's
        own; returns those the destination accepted. Only the headers are read beforehand
        (the contexts to ask for); each file is read as it is sent, so hundreds waiting cost
        no memory, and none is read at all while the destination cannot be reached."""
        import pydicom
        from pynetdicom import AE
        title, host, port = parse_destination(self.config.send_to)
        ae = AE(ae_title=self.config.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.config.timeout_s
        headers = {}
        for path in paths:
            try:
                headers[path] = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception as error:  # a damaged file: set aside, not sent for ever
                log.error("%s cannot be read (%s): left in the outbox for a person", path,
                          error)
                path.rename(path.with_suffix(".unreadable"))
        contexts = {(h.SOPClassUID, h.file_meta.TransferSyntaxUID) for h in headers.values()}
        for sop_class, syntax in contexts:
            ae.add_requested_context(sop_class, syntax)
        assoc = ae.associate(host, port, ae_title=title)
        if not assoc.is_established:
            self.metrics.results_sent.labels("failed").inc(len(headers))
            raise ConnectionError(f"{title}@{host}:{port} cannot be reached or refused the "
                                  f"association")
        accepted = []
        try:
            for path, header in headers.items():
                status = assoc.send_c_store(path)
                code = getattr(status, "Status", None)
                self.metrics.results_sent.labels("sent" if code == SUCCESS else
                                                 "refused").inc()
                if code == SUCCESS:
                    accepted.append(path)
                else:
                    log.warning("%s@%s:%s answered 0x%04X to %s: it stays in the outbox",
                                title, host, port, code or 0xFFFF, header.SOPInstanceUID)
        finally:
            assoc.release()
        return accepted


def start_node(run_dir: str | Path, config: DicomNodeConfig, block: bool = False) -> DicomNode:
    """Load the run and start the node; with ``block``, serve until interrupted."""
    from pynetdicom import AE, _config, evt
    from pynetdicom.sop_class import Verification

    from covidxray.deploy.records import PredictionLog, default_audit_url
    from covidxray.run.predictor import Predictor
    check_node_folders(config, run_dir)
    limit_arenas()  # before the association threads start
    predictor = Predictor.load(run_dir, gate=config.gate, runtime=config.runtime)
    _config.STORE_RECV_CHUNKED_DATASET = True  # instances go to a temporary file, not memory
    # highdicom tells every attribute it copies at INFO: one line per module per result
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    node = DicomNode(config, predictor,
                     PredictionLog(config.audit_db or default_audit_url(Path(run_dir))),
                     NodeMetrics.create())
    if config.send_to:
        node.outbox = Outbox(outbox_folder(config, run_dir), node._send,
                             config.outbox_expiry_h * 3600).start()
        waiting = len(node.outbox.waiting())
        if waiting:
            log.info("%d results wait in %s from before: sending them", waiting,
                     node.outbox.folder)
    ae = AE(ae_title=config.ae_title)
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = config.timeout_s
    if config.allowed_aes:
        ae.require_calling_aet = list(config.allowed_aes)
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    handlers = [(evt.EVT_C_ECHO, node.on_echo), (evt.EVT_C_STORE, node.on_store),
                (evt.EVT_RELEASED, node.on_release), (evt.EVT_ABORTED, node.on_release)]
    if config.metrics_port:
        from prometheus_client import start_http_server
        start_http_server(config.metrics_port, addr="127.0.0.1", registry=node.metrics.registry)
    server = ae.start_server((config.host, config.port), block=False,
                             ssl_context=tls_context(config), evt_handlers=handlers)
    allowed = set(config.allowed_hosts)
    # socketserver's own hook, before an association is looked at: other hosts are dropped
    server.verify_request = lambda request, address: not allowed or address[0] in allowed or \
        _refused_host(address)
    node.server = server
    log.info("DICOM node %s on %s:%d (%s), answering %s; results %s", config.ae_title,
             config.host, node.port, "TLS" if config.tls_cert else "no TLS",
             ", ".join(config.allowed_aes) or "any calling AE title",
             " and ".join(filter(None, [config.out and f"to {config.out}",
                                        config.send_to and f"sent to {config.send_to}"]))
             or "recorded only")
    if block:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            node.stop()
    return node


def outbox_folder(config: DicomNodeConfig, run_dir) -> Path:
    """Where results wait for the PACS: ``config.outbox``, else the run's serve folder."""
    return Path(config.outbox) if config.outbox else RunFolder(run_dir).outbox_folder


def check_node_folders(config: DicomNodeConfig, run_dir) -> None:
    """Before the node starts: the folders it writes to must take a file (a node that scored
    every film and then failed to keep a result would have to refuse them all)."""
    folders = ([("--out", Path(config.out))] if config.out else []) + (
        [("the outbox", outbox_folder(config, run_dir))] if config.send_to else [])
    if config.send_to:
        parse_destination(config.send_to)
    for what, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            handle, probe = tempfile.mkstemp(prefix=".covidxray-write-check-", dir=folder)
            os.close(handle)
            os.unlink(probe)
        except OSError as error:
            raise UserError(f"{folder} ({what}) cannot be written ({error.strerror or error}): "
                            f"the node does not start; choose a folder it can write to") \
                from None


def _header(data: bytes):
    """The instance's data set without its pixels (None: not readable as DICOM; the reader
    says why when it is scored)."""
    import io

    import pydicom
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
    except Exception:
        return None


def _refused_host(address) -> bool:
    log.warning("connection from %s refused: not an allowed host", address[0])
    return False
