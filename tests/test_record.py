"""One prediction record: every output format is derived from its fields, so a field added to
``Prediction`` appears in an archive's CSV and Parquet files, the REST answer and the
prediction record's table with no other change."""

from dataclasses import dataclass, field

import pytest

from covidxray.run.record import SET_SEPARATOR, Prediction, column, record_fields


@dataclass
class Extended(Prediction):
    """The record with one more field, as a later version might add."""

    second_opinion: float | None = field(default=None, metadata=column("float"))


def test_a_field_added_to_the_record_reaches_every_output(tmp_path):
    pytest.importorskip("pyarrow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("fastapi")
    from covidxray.deploy.batch import CsvResults, ParquetResults, columns, result_schema
    from covidxray.deploy.serve.app import result_model
    from covidxray.deploy.records import PredictionLog, Served
    made = Extended("a.png", 0.7, label="COVID", positive=True, ood=False,
                    prediction_set=["COVID"], verdict="COVID", second_opinion=0.25)
    row = {**made.row(), "model_id": "m", "synthetic_data": False}
    assert "second_opinion" in columns(Extended) and "second_opinion" not in columns()

    csv_file = tmp_path / "results.csv"
    CsvResults(csv_file, "m", record=Extended).write([row])
    header, line = csv_file.read_text().splitlines()
    assert "second_opinion" in header.split(",")
    assert dict(zip(header.split(","), line.split(",")))["second_opinion"] == "0.25"

    import pyarrow.parquet as pq
    assert "second_opinion" in result_schema(Extended).names
    ParquetResults(tmp_path / "results.parquet", "m", record=Extended).write([row])
    table = pq.read_table(next((tmp_path / "results.parquet").glob("part-*.parquet")))
    assert table.column("second_opinion").to_pylist() == [0.25]

    answer = result_model(Extended)(**made.to_dict(), threshold=0.5, model_id="m")
    assert answer.model_dump()["second_opinion"] == 0.25

    record = PredictionLog(f"sqlite:///{tmp_path / 'record.sqlite'}", Extended)
    record.record([Served(made, "r1", "m", "0" * 64)])
    (kept,) = record.rows()
    assert kept["second_opinion"] == 0.25 and kept["prediction_set"] == "COVID"
    assert kept["filename"] == "a.png" and kept["channel"] == "rest"

    pytest.importorskip("highdicom")
    import json

    import numpy as np
    from pydicom.dataset import Dataset

    from covidxray.deploy.dicom.results import prepared_source, structured_report
    from test_dicom_node import _metadata
    source = Dataset()
    source.SOPClassUID, source.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", "1.2.3.4.5"
    source.StudyInstanceUID, source.SeriesInstanceUID = "1.2.3.4", "1.2.3.4.6"
    source.Modality, source.PatientName, source.PatientID = "CR", "Test^Film", "p1"
    prepared_source(source)
    report = structured_report(source, made, _metadata())
    carried = next(json.loads(item.TextValue) for item in report.ContentSequence
                   if item.ConceptNameCodeSequence[0].CodeValue == "RECORD")
    assert carried["second_opinion"] == 0.25 and np.isclose(carried["probability"], 0.7)


def test_flat_rows_join_sets_and_write_mappings_as_json():
    made = Prediction("b.png", 0.4, prediction_set=["NON-COVID", "COVID"],
                      class_probabilities={"COVID": 0.4, "NORMAL": 0.6})
    row = made.row()
    assert row["prediction_set"] == SET_SEPARATOR.join(["NON-COVID", "COVID"])
    assert row["class_probabilities"] == '{"COVID": 0.4, "NORMAL": 0.6}'
    assert set(row) == {f.name for f in record_fields()}
    assert "heatmap" not in made.to_dict() and "image" not in row
