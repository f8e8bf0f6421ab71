"""The thumbnail baseline learns what image statistics give away, and nothing more."""

import numpy as np
from PIL import Image

from covidxray.config import Preprocessing
from covidxray.data.dataset import Record
from covidxray.evaluation.baselines import thumbnail_logistic_regression
from covidxray.metrics import roc_auc


def records_of(root, n, split, brightness_gap, rng):
    out = []
    for i in range(n):
        target = i % 2
        image = rng.uniform(0.3, 0.6, (32, 32)) + brightness_gap * target
        path = root / f"{split}-{i}.png"
        Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).save(path)
        out.append(Record(str(path), "COVID" if target else "NORMAL", target, split=split))
    return out


def test_brightness_is_learned_and_the_threshold_comes_from_validation(tmp_path):
    rng = np.random.default_rng(0)
    train, val, test = (records_of(tmp_path, n, s, 0.2, rng)
                        for n, s in ((40, "train"), (20, "val"), (20, "test")))
    result = thumbnail_logistic_regression(train, val, test)
    assert roc_auc(np.array([r.target for r in test]), result.test_scores) > 0.95
    assert 0 < result.threshold < 1 and "16px" in result.name


def test_unreadable_test_files_are_left_out(tmp_path):
    rng = np.random.default_rng(1)
    train, val, test = (records_of(tmp_path, n, s, 0.2, rng)
                        for n, s in ((20, "train"), (10, "val"), (6, "test")))
    (tmp_path / "bad.png").write_text("not an image")
    test.append(Record(str(tmp_path / "bad.png"), "COVID", 1, split="test"))
    result = thumbnail_logistic_regression(train, val, test, Preprocessing(8, "percentile"))
    assert len(result.test_records) == len(result.test_scores) == 6
    assert "8px-percentile" in result.name
