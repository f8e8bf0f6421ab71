"""A prediction as DICOM objects a PACS viewer shows beside the film, in the film's study:
a Structured Report with the result and a Secondary Capture of the heat map (highdicom).

The report is a Comprehensive SR (not the TID 1500 measurement report): TID 1500 holds
measurements and coded evaluations of regions, and has no place for what a reader of this
result must see in words (the research-use notice, the out-of-distribution reason, the model
id); a Comprehensive SR carries them as TEXT items beside the NUM and CODE items, under one
titled container, and every viewer lists it. Codes of our own concepts use the private coding
scheme ``99COVIDXRAY``; COVID-19 itself is SNOMED CT 840539006.

Both objects are new series with their own UIDs; patient and study identifiers are copied from
the film, which the SR references.
"""

from __future__ import annotations

import json
import re

import numpy as np

from covidxray.config import RESEARCH_NOTICE
from covidxray.run.conformal import NOT_FRONTAL
from covidxray.version import __version__

SCHEME = "99COVIDXRAY"
BURNED_IN = "RESEARCH USE ONLY - NOT FOR DIAGNOSIS"
MANUFACTURER = "covidxray"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


def _code(value: str, meaning: str, scheme: str = SCHEME):
    from highdicom.sr import CodedConcept
    return CodedConcept(value, scheme, meaning)


# the patient and study attributes the results copy from the film: Type 2 in its IOD (present,
# possibly empty), yet some senders leave them out
COPIED_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber")


# a DICOM UID: digits and dots, each component without a leading zero, at most 64 characters
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# what the results need of the film to join its study and point at it
REQUIRED_UIDS = ("StudyInstanceUID", "SOPInstanceUID", "SOPClassUID")


def is_uid(value) -> bool:
    text = str(value)
    return len(text) <= 64 and bool(UID_PATTERN.match(text))


def bad_uid(source) -> str | None:
    """Why the film's UIDs cannot name a file or a result (None: they can): a UID that is
    present but not digits and dots (a path, say)."""
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        value = source.get(keyword)
        if value is not None and str(value) and not is_uid(value):
            return (f"{keyword} {str(value)[:80]!r} is not a DICOM UID (digits and dots, at "
                    f"most 64 characters)")
    return None


def missing_for_results(source) -> list[str]:
    """The UIDs the results need that the film lacks (their study, the film they point at)."""
    return [keyword for keyword in REQUIRED_UIDS if not str(source.get(keyword) or "")]


def prepared_source(source) -> list[str]:
    """Make ``source`` fit to copy into the results: every attribute of ``COPIED_TYPE2`` it
    lacks added, empty (what an absent Type 2 attribute means), and every date or time among
    them that is not one blanked the same way (a sender's "notadate" would fail the SR).
    Returns what was blanked, for the log."""
    from pydicom.valuerep import DA, DT, TM
    blanked = []
    for keyword in COPIED_TYPE2:
        if keyword not in source:
            setattr(source, keyword, "")
            continue
        element = source[keyword]
        reader = {"DA": DA, "TM": TM, "DT": DT}.get(element.VR)
        if reader is None or not element.value:
            continue
        try:
            reader(str(element.value))
        except (ValueError, TypeError):
            blanked.append(f"{keyword} {str(element.value)[:40]!r} is not a valid "
                           f"{element.VR}: left empty in the results")
            element.value = ""
    return blanked


def result_objects(source, prediction, metadata, overlay_rgb: np.ndarray) -> list:
    """The Structured Report and the Secondary Capture of ``prediction`` of the film
    ``source`` (its pydicom data set, pixel data not needed, made fit by
    ``prepared_source``)."""
    return [structured_report(source, prediction, metadata),
            secondary_capture(source, overlay_rgb, prediction)]


P_COVID = ("P-COVID", "Probability of COVID-19 (model score)")
THRESHOLD = ("THRESHOLD", "Operating threshold, frozen on validation")


def structured_report(source, prediction, metadata):
    """The Comprehensive SR of ``prediction`` (a ``run.predictor.Prediction``) of the film
    ``source`` (its pydicom data set with ``COPIED_TYPE2`` present), made by the run of
    ``metadata``."""
    import highdicom as hd
    from highdicom.sr import CodeContentItem, ContainerContentItem, ImageContentItem, \
        NumContentItem, RelationshipTypeValues, TextContentItem
    from pydicom.uid import generate_uid
    contains = RelationshipTypeValues.CONTAINS
    unit = _code("1", "no units", "UCUM")
    root = ContainerContentItem(_code("COVIDXRAY-RESULT", "covidxray chest X-ray "
                                      "classification (research use only)"))
    root.ContentSequence = []
    items = [
        TextContentItem(_code("NOTICE", "Research-use notice"), RESEARCH_NOTICE, contains),
        NumContentItem(_code(*P_COVID), float(prediction.probability), unit,
                       relationship_type=contains),
        CodeContentItem(_code("LABEL", "Label at the threshold"),
                        _label_code(prediction, metadata), contains),
        NumContentItem(_code(*THRESHOLD), float(metadata.threshold), unit,
                       relationship_type=contains),
        TextContentItem(_code("MODEL", "Model id"), metadata.model_id, contains),
        TextContentItem(_code("OOD", "Out-of-distribution verdict"),
                        "flagged: " + (prediction.ood_reason or "unlike the training films")
                        if prediction.ood else "not flagged" if prediction.ood is False
                        else "no gate", contains),
    ]
    if prediction.ood:
        items.append(TextContentItem(_code("SET", "Prediction set"), f"{NOT_FRONTAL} (the "
                                     f"score above is for research only)", contains))
    elif prediction.verdict is not None:
        items.append(TextContentItem(
            _code("SET", "Prediction set"),
            f"{prediction.verdict} (conformal set {{{', '.join(prediction.prediction_set)}}} at "
            f"{metadata.confidence:.0%} confidence)", contains))
    if prediction.lung_heat_share is not None:
        items.append(NumContentItem(_code("LUNG-HEAT", "Share of the heat map inside the "
                                          "lungs found"), float(prediction.lung_heat_share),
                                    unit, relationship_type=contains))
    # every field of the prediction's record (run.record): what the other outputs carry too
    items.append(TextContentItem(_code("RECORD", "covidxray prediction record (JSON)"),
                                 json.dumps(prediction.row()), contains))
    items.append(ImageContentItem(_code("SOURCE", "Source image"), source.SOPClassUID,
                                  source.SOPInstanceUID, relationship_type=contains))
    for item in items:
        root.ContentSequence.append(item)
    report = hd.sr.ComprehensiveSR(
        evidence=[source], content=root, series_instance_uid=generate_uid(),
        series_number=SR_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, is_complete=True, is_final=False, is_verified=False)
    report.SeriesDescription = f"covidxray {__version__}: {BURNED_IN}"
    return report


def _label_code(prediction, metadata):
    if prediction.ood:  # the gate flagged it: no call is made, whatever the score
        return _code("NO-VERDICT", NOT_FRONTAL)
    if prediction.positive:
        return _code("840539006", "Disease caused by SARS-CoV-2", "SCT")
    return _code("NOT-COVID", metadata.negative_label)


def secondary_capture(source, overlay_rgb: np.ndarray, prediction):
    """A Secondary Capture of the heat-map overlay (RGB, the film's size), with the notice
    and the score burned into the pixels (``source`` with ``COPIED_TYPE2`` present)."""
    import highdicom as hd
    from pydicom.uid import generate_uid
    headline = NOT_FRONTAL.upper() if prediction.ood else \
        f"P(COVID) {prediction.probability:.3f}: {prediction.verdict or prediction.label}"
    image = burn_in(overlay_rgb, [BURNED_IN, headline])
    # as the film is shown; a film that does not say is taken as a frontal chest film is
    # shown (rows toward the patient's left, columns toward the feet)
    orientation = tuple(getattr(source, "PatientOrientation", None) or ()) or ("L", "F")
    capture = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=image, photometric_interpretation="RGB",
        bits_allocated=8, coordinate_system="PATIENT", patient_orientation=orientation[:2],
        series_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=MANUFACTURER, transfer_syntax_uid="1.2.840.10008.1.2.1")
    capture.BurnedInAnnotation = "YES"
    capture.SeriesDescription = f"covidxray heat map: {BURNED_IN}"
    return capture


def burn_in(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """``lines`` written on a dark band at the top of an RGB image, large enough to read
    (about a twentieth of the image's height each)."""
    from PIL import Image, ImageDraw, ImageFont
    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    size = max(10, image.height // 24)
    try:
        font = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the small bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)
    draw.rectangle([0, 0, image.width, int(size * 1.3 * len(lines) + size // 2)], fill=(0, 0, 0))
    for index, line in enumerate(lines):
        draw.text((size // 2, size // 4 + int(index * size * 1.3)), line, fill=(255, 255, 0),
                  font=font)
    return np.asarray(image)


def probability_of(report) -> float | None:
    """P(COVID) read back from a report made by ``structured_report`` (None: not one)."""
    for item in getattr(report, "ContentSequence", []):
        name = item.ConceptNameCodeSequence[0]
        if (name.CodingSchemeDesignator, name.CodeValue) == (SCHEME, P_COVID[0]):
            return float(item.MeasuredValueSequence[0].NumericValue)
    return None
