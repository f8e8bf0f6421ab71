import numpy as np
import pytest

import covidxray
from covidxray.run.inputs import collect_paths
from covidxray.run.predictor import Predictor, RunError


def test_load_and_predict_path_array_and_list(tiny_run, tiny_data):
    predictor = covidxray.load(tiny_run)
    path = sorted((tiny_data / "COVID").glob("*.png"))[0]
    from_path = predictor.predict(path)
    assert 0 <= from_path.probability <= 1 and from_path.error is None
    assert from_path.label == ("COVID" if from_path.positive else "NON-COVID")
    from PIL import Image
    pixels = np.asarray(Image.open(path))
    from_array = predictor.predict(pixels)
    assert from_array.probability == pytest.approx(from_path.probability, abs=1e-5)
    from_float = predictor.predict(pixels / 255.0)
    assert from_float.probability == pytest.approx(from_path.probability, abs=1e-5)
    many = predictor.predict([path, path])
    assert [p.probability for p in many] == pytest.approx([from_path.probability] * 2, abs=1e-5)


def test_prediction_matches_the_evaluation_path(tiny_run, tiny_data):
    """Prediction and training share one preprocessing: the same file gives the same score."""
    from covidxray.data.dataset import discover, load_images
    predictor = Predictor.load(tiny_run)
    records = discover(tiny_data).records[:4]
    batch = predictor.predict_prepared(load_images(records, predictor.preprocessing).images)
    single = [predictor.predict(r.path).probability for r in records]
    np.testing.assert_allclose(batch, single, atol=1e-5)


def test_one_forward_pass_gives_the_models_scores(tiny_run, tiny_data):
    """``predict_items`` derives scores, gate features and heat maps from one pass to the last
    convolutional stage; its scores must be those of the whole model."""
    from covidxray.data.dataset import discover
    from covidxray.model.network import predict_scores
    from covidxray.pixels.transforms import mean_over_views
    predictor = Predictor.load(tiny_run, runtime="keras")  # its Keras model is compared
    items = [predictor.prepare(r.path) for r in discover(tiny_data).records[:5]]
    images = np.stack([item.image for item in items])
    predictions = predictor.predict_items(items, heatmaps=True)
    expected = mean_over_views(lambda x: predict_scores(predictor.model, x), images,
                               predictor.test_time_views)  # the image alone without views
    np.testing.assert_allclose([p.probability for p in predictions], expected, atol=1e-5)
    for item, prediction in zip(items, predictions):
        assert prediction.heatmap.shape == item.gray.shape  # on the file's own pixels
        assert 0 <= prediction.heatmap.min() and prediction.heatmap.max() <= 1


def test_a_colour_photo_is_flagged_out_of_distribution(tiny_run):
    predictor = Predictor.load(tiny_run)
    photo = np.zeros((120, 120, 3), np.uint8)
    photo[..., 0], photo[..., 1] = 200, 90  # an orange picture
    result = predictor.predict(photo)
    assert result.probability is not None  # still given, but marked
    assert result.ood is True and "colour image" in result.ood_reason


def test_bad_files_keep_their_place(tiny_run, tiny_data, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("x")
    good = sorted((tiny_data / "COVID").glob("*.png"))[0]
    results = covidxray.predict(tiny_run, [bad, good, tmp_path / "missing.png"])
    assert [r.error is None for r in results] == [False, True, False]
    assert "not a recognised image" in results[0].error and "cannot read" in results[2].error


def test_collect_paths_recurses_folders(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    for name in ("a/x.png", "a/b/y.dcm", "a/b/z", "a/readme.txt"):
        (tmp_path / name).write_bytes(b"1")
    assert [p[len(str(tmp_path)) + 1:] for p in collect_paths([tmp_path / "a"])] == \
        ["a/b/y.dcm", "a/b/z", "a/x.png"]


def test_incomplete_run_is_refused(tmp_path):
    (tmp_path / "metadata.json").write_text("{}")
    with pytest.raises(RunError, match="model.keras"):
        Predictor.load(tmp_path)


@pytest.mark.parametrize("kind", ["colour", "16-bit", "alpha"])
def test_a_file_and_its_pixels_as_an_array_give_one_probability(tiny_run, tiny_data, tmp_path,
                                                                 kind):
    from PIL import Image
    predictor = Predictor.load(tiny_run)
    gray = np.asarray(Image.open(sorted((tiny_data / "COVID").glob("*.png"))[0]).convert("L"))
    if kind == "colour":  # a tinted screenshot of a film
        pixels = np.stack([gray, (gray * 0.9).astype(np.uint8), (gray * 0.7).astype(np.uint8)],
                          axis=-1)
        image = Image.fromarray(pixels, "RGB")
    elif kind == "16-bit":  # 12 significant bits in a 16-bit container
        pixels = gray.astype(np.uint16) * 16
        image = Image.fromarray(pixels)
    else:  # transparent margins
        alpha = np.full(gray.shape, 255, np.uint8)
        alpha[:, :10] = 0
        pixels = np.dstack([gray, gray, gray, alpha])
        image = Image.fromarray(pixels, "RGBA")
    path = tmp_path / f"{kind}.png"
    image.save(path)
    from_file, from_array = predictor.predict(path), predictor.predict(pixels)
    assert from_file.error is None and from_array.error is None
    assert from_array.probability == pytest.approx(from_file.probability, abs=1e-6)
    assert from_array.ood == from_file.ood
    from_bytes = predictor.predict(path.read_bytes())
    assert from_bytes.probability == pytest.approx(from_file.probability, abs=1e-6)


def test_an_unusable_array_is_an_error_naming_it(tiny_run):
    result = Predictor.load(tiny_run).predict(np.zeros((4, 4, 5), np.uint8))
    assert result.path == "<array>" and "shape" in result.error and result.probability is None


def test_every_row_is_written_whatever_the_file_name(tiny_run, tiny_data, tmp_path):
    import csv
    import os
    import shutil
    odd = os.fsdecode(bytes(tmp_path) + b"/scan-\xff\xfe.png")  # not valid UTF-8
    shutil.copy(sorted((tiny_data / "COVID").glob("*.png"))[0], odd)
    normal = tmp_path / "plain.png"
    shutil.copy(sorted((tiny_data / "COVID").glob("*.png"))[1], normal)
    from covidxray.api import score
    done = score(tiny_run, [tmp_path], tmp_path / "out.csv")
    rows = list(csv.DictReader(open(tmp_path / "out.csv", encoding="utf-8")))
    assert len(rows) == done["scored"] == 2 and all(r["probability"] for r in rows)
    again = score(tiny_run, [tmp_path], tmp_path / "out.csv")  # the odd name is found again
    assert again["scored"] == 0 and again["already_done"] == 2
    assert any("scan-" in r["path"] and "\\udcff" in r["path"] for r in rows)


def test_a_hostile_header_beside_good_files_loses_nothing(tiny_run, tiny_data, tmp_path,
                                                          monkeypatch):
    from pydicom import config

    from test_decode import gradient, write_dicom
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)
    bad = write_dicom(tmp_path / "bad.dcm", np.rint(gradient() * 1000), window=(500.0, 0.0))
    good = sorted((tiny_data / "COVID").glob("*.png"))[:2]
    results = covidxray.predict(tiny_run, [good[0], bad, good[1]])
    assert [r.error is None for r in results] == [True, False, True]
    assert "window width" in results[1].error and results[1].path == str(bad)


def _rewrite_metadata(run, **changes):
    import json
    path = run / "metadata.json"
    values = json.loads(path.read_text())
    for name, value in changes.items():
        if "." in name:
            outer, inner = name.split(".")
            values[outer][inner] = value
        else:
            values[name] = value
    path.write_text(json.dumps(values))


@pytest.mark.parametrize("field, value", [
    ("test_time_views", -5), ("temperature", -1.0), ("temperature", 0), ("threshold", 1.5),
    ("preprocessing.image_size", 0), ("preprocessing.intensity", "magic"),
    ("preprocessing.crop", 0.7), ("confidence", 1.0), ("members", [3])])
def test_metadata_out_of_range_fails_load_naming_the_file_and_field(own_run, field, value):
    _rewrite_metadata(own_run, **{field: value})
    with pytest.raises(RunError, match=rf"metadata.json: invalid run metadata: field {field}"):
        Predictor.load(own_run)


def test_an_image_size_that_is_not_the_models_input_is_named(own_run):
    size = Predictor.load(own_run).image_size
    _rewrite_metadata(own_run, **{"preprocessing.image_size": size + 32})
    with pytest.raises(RunError, match="metadata.json: field preprocessing.image_size: "
                                       f"{size + 32} is not the input size"):
        Predictor.load(own_run)


def test_a_damaged_gate_fails_closed_unless_no_gate(own_run, tiny_data):
    """A gate that cannot be read stops the load (every verdict rests on it); ``--no-gate``
    predicts without one. A pickled gate file is refused the same way."""
    from covidxray.cli import main
    gate = own_run / "ood.npz"
    gate.write_bytes(gate.read_bytes()[:1000])  # truncated
    with pytest.raises(RunError, match=r"ood.npz is damaged \(BadZipFile"):
        Predictor.load(own_run)
    assert Predictor.load(own_run, gate=False).gate is None
    film = str(sorted((tiny_data / "COVID").glob("*.png"))[0])
    assert main(["predict", str(own_run), film, "--no-gate", "--json"]) == 0
    assert main(["predict", str(own_run), film]) == 1
    np.savez(gate, train_thumbnails=np.array([{"a": 1}], dtype=object))
    with pytest.raises(RunError, match="ood.npz is damaged"):
        Predictor.load(own_run)


def test_damaged_or_foreign_prediction_sets_are_refused(own_run):
    from covidxray.run.conformal import ConformalSets
    sets_file = own_run / "conformal.npz"
    sets = ConformalSets.load(sets_file)
    ConformalSets(["CAT", "DOG"], sets.calibration, sets.confidence).save(sets_file)
    with pytest.raises(RunError, match=r"conformal.npz: its classes \{CAT, DOG\} are not"):
        Predictor.load(own_run)
    sets_file.write_bytes(b"PK\x03\x04 not an archive")
    with pytest.raises(RunError, match="conformal.npz is damaged"):
        Predictor.load(own_run)


def test_an_ensemble_that_holds_itself_or_a_cycle_is_refused(own_run, tmp_path):
    import shutil
    _rewrite_metadata(own_run, members=["."])
    with pytest.raises(RunError, match="member '.' is the ensemble itself"):
        Predictor.load(own_run)
    _rewrite_metadata(own_run, members=["/etc"])
    with pytest.raises(RunError, match="lies outside the ensemble's folder"):
        Predictor.load(own_run)
    # a member that names its ensemble's folder from inside
    outer = tmp_path / "outer"
    shutil.copytree(own_run, outer / "members" / "0")
    shutil.copy(own_run / "metadata.json", outer / "metadata.json")
    _rewrite_metadata(outer, members=["members/0"])
    _rewrite_metadata(outer / "members" / "0", members=["../.."])
    with pytest.raises(RunError, match="is the ensemble itself|lead back to itself"):
        Predictor.load(outer)
