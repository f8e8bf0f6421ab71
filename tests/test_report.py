import json
import re

import pytest
from browser import open_page

from covidxray.cli import main
from covidxray.config import Preprocessing
from covidxray.evaluation.report import gallery_cases, model_description
from covidxray.run.folder import RunFolder
from covidxray.run.metadata import RunMetadata


def metadata(**values) -> RunMetadata:
    """A run's metadata with what the card reads; ``values`` replace its fields."""
    return RunMetadata(**{**dict(
        class_names=["COVID", "NORMAL", "PNEUMONIA"], positive_class="COVID",
        preprocessing=Preprocessing(224), backbone="resnet50", weights="imagenet",
        threshold=0.5, threshold_method="youden", model_id="test", data_fingerprint="",
        created="", covidxray_version="", backend=""), **values})


def test_gallery_picks_confident_cases_of_each_kind():
    cases = [{"path": "a", "score": 0.9, "target": 1}, {"path": "b", "score": 0.6, "target": 1},
             {"path": "c", "score": 0.7, "target": 0}, {"path": "d", "score": 0.1, "target": 1},
             {"path": "e", "score": 0.2, "target": 0}]
    kinds = gallery_cases(cases, 0.5, per_kind=1)
    assert {k: [c["path"] for c in v] for k, v in kinds.items()} == {
        "true positive": ["a"], "false positive": ["c"], "false negative": ["d"],
        "true negative": ["e"]}


def test_the_card_describes_the_head_the_run_has():
    plain = model_description(metadata(selection={"phase_kept": 1}),
                              {"pooled_stages": 1, "dropout": 0.3, "finetune_epochs": 0})
    assert plain == ("resnet50 backbone, frozen (ImageNet weights): the head alone was trained; "
                     "head: global average pooling of the last stage, dropout 0.3, then one "
                     "sigmoid unit, P(COVID); input 224 px")
    three = metadata(output_classes=["COVID", "PNEUMONIA", "NORMAL"], selection={"phase_kept": 2})
    wide = model_description(three, {"pooled_stages": 4, "dropout": 0.2, "finetune_epochs": 5,
                                     "unfreeze_stages": 2})
    assert wide == ("resnet50 backbone, fine-tuned from ImageNet weights: its top 2 stages "
                    "trained with the head (the fine-tuned weights were kept); head: the pooled "
                    "outputs of the top 4 stages, concatenated, dropout 0.2, then a softmax over "
                    "3 classes (COVID, PNEUMONIA, NORMAL), P(COVID) its COVID output; input 224 px")
    assert "global average pooling" not in wide and "sigmoid" not in wide
    # fine-tuning ran, but the head phase's weights won: the backbone the model has is frozen
    assert "frozen (ImageNet weights): the head alone (the head phase's weights scored " \
        "better" in model_description(metadata(selection={"phase_kept": 1}),
                                      {"pooled_stages": 1, "finetune_epochs": 5})
    assert "which phase's weights were kept is not recorded" in model_description(
        metadata(), {"pooled_stages": 1, "finetune_epochs": 5, "unfreeze_stages": 1})
    ensemble = metadata(members=["members/0", "members/1"], backbone="ensemble of 2: a, b")
    member = {"pooled_stages": 1, "dropout": 0.3, "finetune_epochs": 0}
    assert model_description(ensemble, member, [(metadata(), member), (three, member)]) == (
        "An ensemble, the mean of its 2 members' P(COVID); member 1: "
        + model_description(metadata(), member) + "; member 2: "
        + model_description(three, member))
    assert model_description(ensemble, member, [(metadata(), member)] * 2).startswith(
        "An ensemble, the mean of its 2 members' P(COVID); each: resnet50 backbone, frozen")


@pytest.mark.slow
def test_the_card_reads_the_head_from_the_run_folder(own_run):
    folder = RunFolder(own_run)
    config = json.loads(folder.config_file.read_text())
    words = model_description(folder.metadata(), config)
    # the suite's tiny run: random weights, its top stage trained in phase 2
    assert "head: global average pooling of the last stage, dropout 0.3, then one sigmoid " \
        "unit, P(COVID); input 64 px" in words
    assert words.startswith("mobilenetv3small backbone, ")
    values = json.loads(folder.metadata_file.read_text())
    values["output_classes"] = ["COVID", "PNEUMONIA", "NORMAL"]
    values["class_names"] = ["COVID", "NORMAL", "PNEUMONIA"]
    values["selection"] = {**values["selection"], "phase_kept": 2}
    folder.metadata_file.write_text(json.dumps(values))
    folder.config_file.write_text(json.dumps({**config, "pooled_stages": 4}))
    words = model_description(folder.metadata(), folder.read_config().to_dict())
    assert "head: the pooled outputs of the top 4 stages, concatenated, dropout 0.3, then a " \
        "softmax over 3 classes (COVID, PNEUMONIA, NORMAL), P(COVID) its COVID output" in words
    assert "its top 1 stage trained from random weights with the head (phase 2 weights " \
        "were kept)" in words


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
    assert "global average pooling of the last stage, dropout 0.3, then one sigmoid unit, " \
        "P(COVID)" in page
