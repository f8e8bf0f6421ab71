"""How well image statistics alone tell a source's classes apart."""

from dataclasses import replace

import numpy as np
from PIL import Image

from covidxray.data.audit import audit, format_audit
from covidxray.data.dataset import Record
from covidxray.data.statistics import AS_THEY_ARE, STATISTICS_SIZE, \
    image_statistics_separability


def grey_level_source(tmp_path, n=40):
    """A source whose two classes are the same kind of drawn film, one class through another
    grey-level curve (as two collections' processing differ): nothing else tells them apart."""
    from covidxray.data.synthetic import synthetic_radiograph
    rng = np.random.default_rng(3)
    records = []
    for i in range(n):
        covid = bool(i % 2)
        image = synthetic_radiograph(rng, 96) ** (0.75 if covid else 1.35)
        path = tmp_path / f"hosp_{i}.png"
        Image.fromarray(np.rint(image * 255).astype(np.uint8)).save(path)
        records.append(Record(str(path), "COVID" if covid else "NORMAL", int(covid),
                              patient_id=f"p{i}", source="hosp"))
    return records


def test_image_statistics_that_give_the_class_away_are_named(tmp_path):
    from covidxray.config import TrainConfig
    records = grey_level_source(tmp_path)
    result = audit(records, near_distance=None)
    found = result.summary["image_statistics"]["hosp"]
    plain = found["options"][AS_THEY_ARE]
    assert plain["histogram"] > 0.95 and plain["thumbnail"] > 0.9
    assert found["size_and_aspect"] < 0.7  # the files are all the same size
    (warning,) = [w for w in result.warnings if "image statistics alone" in w]
    assert "source 'hosp'" in warning and f"'{found['lowest']}' brings" in warning
    assert "how well image statistics" in format_audit(result)
    # the default pixel options take most of it away (equalised, cropped to the lungs, here
    # where the drawn films have them)
    from conftest import FixedLungs
    default = replace(TrainConfig(data="d", out="o", backbone="efficientnet-lite0")
                      .preprocessing, image_size=STATISTICS_SIZE)
    lungs = FixedLungs([(0.2, 0.8, 0.12, 0.45), (0.2, 0.8, 0.55, 0.88)])
    ours = image_statistics_separability(records, {"default": default},
                                         segmenter=lungs)["hosp"]["options"]
    # "most": less than half of what the files give away above chance (0.5) is left
    assert max(ours["default"].values()) - 0.5 < 0.5 * (max(plain.values()) - 0.5)


def test_the_study_and_the_thumbnail_baseline_share_one_thumbnail(tmp_path, monkeypatch):
    """The study's thumbnails of an option are the baseline's thumbnails (evaluation.baselines)
    of the same records prepared the same way: one thumbnail, one regression."""
    from covidxray.config import Preprocessing
    from covidxray.data import statistics
    from covidxray.evaluation import baselines
    assert baselines.thumbnails is statistics.thumbnails
    records = grey_level_source(tmp_path, n=20)
    seen, real = [], statistics.thumbnail_features
    monkeypatch.setattr(statistics, "thumbnail_features",
                        lambda images: seen.append(real(images)) or seen[-1])
    spec = Preprocessing(STATISTICS_SIZE, "equalize", 0.08)
    statistics.image_statistics_separability(records, {"eq": spec})
    made, _, _ = baselines.thumbnails(records, replace(spec, image_size=statistics.THUMBNAIL_SIZE))
    assert seen[0].shape == (20, statistics.THUMBNAIL_SIZE ** 2)
    np.testing.assert_array_equal(seen[0], made)
