import re

import pytest
from browser import open_page

from covidxray.cli import main
from covidxray.evaluation.report import gallery_cases


def test_gallery_picks_confident_cases_of_each_kind():
    metrics = {"threshold": 0.5, "cases": [
        {"path": "a", "score": 0.9, "target": 1}, {"path": "b", "score": 0.6, "target": 1},
        {"path": "c", "score": 0.7, "target": 0}, {"path": "d", "score": 0.1, "target": 1},
        {"path": "e", "score": 0.2, "target": 0}]}
    kinds = gallery_cases(metrics, per_kind=1)
    assert {k: [c["path"] for c in v] for k, v in kinds.items()} == {
        "true positive": ["a"], "false positive": ["c"], "false negative": ["d"],
        "true negative": ["e"]}


@pytest.mark.slow
def test_report_is_self_contained_and_renders(own_run, tmp_path, capsys):
    out = tmp_path / "report.html"
    assert main(["report", str(own_run), "--out", str(out)]) == 0
    page = out.read_text()
    for section in ("Not a medical device", "Audit warnings", "95% CI", "Per source",
                    "Shortcut check", "Grad-CAM gallery", "Model card", "CLAIM", "SYNTHETIC"):
        assert section in page, section
    assert not re.search(r"""(src|href)=["']https?:""", page)  # nothing fetched from a network
    assert page.count("data:image/png;base64,") >= 6
    errors, broken = open_page(out.as_uri(), tmp_path / "report.png")
    assert errors == [] and broken == []
    assert (tmp_path / "report.png").stat().st_size > 10_000
    assert (own_run / "audit.json").is_file()
