import json
from dataclasses import replace

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from covidxray.cli import main
from covidxray.data.audit import (
    audit,
    difference_hash,
    format_audit,
    near_duplicate_pairs,
)
from covidxray.data.dataset import Record


def smooth_image(seed, size=64):
    field = gaussian_filter(np.random.default_rng(seed).random((size, size)), 4)
    field = (field - field.min()) / (field.max() - field.min())
    return (field * 255).astype(np.uint8)


def clean_set(tmp_path, n=12):
    """Distinct images, both classes in every split, no patient twice."""
    records = []
    for i in range(n):
        label = "COVID" if i % 2 else "NORMAL"
        path = tmp_path / f"img{i}.png"
        Image.fromarray(smooth_image(i)).save(path)
        records.append(Record(path=str(path), label=label, target=int(label == "COVID"),
                              patient_id=f"p{i}", source="a" if i < n // 2 else "b",
                              split=("train", "val", "test")[i % 3]))
    return records


def test_clean_set_is_quiet(tmp_path):
    result = audit(clean_set(tmp_path))
    s = result.summary
    assert not s["exact_duplicates"] and not s["near_duplicates"] and not s["label_conflicts"]
    assert not s["patient_leaks"] and not result.leak and result.warnings == []


def test_planted_cross_split_duplicate(tmp_path):
    records = clean_set(tmp_path)
    copy = tmp_path / "copy.png"
    copy.write_bytes(open(records[0].path, "rb").read())
    records.append(Record(path=str(copy), label=records[0].label, target=records[0].target,
                          patient_id="p99", split="test"))
    result = audit(records)
    assert result.leak
    assert [sorted(g["paths"]) for g in result.summary["cross_split_duplicates"]] == \
        [sorted([records[0].path, str(copy)])]
    assert any("LEAK" in w for w in result.warnings)


def test_planted_label_conflict_from_a_reencoded_copy(tmp_path):
    records = clean_set(tmp_path)
    jpeg = tmp_path / "copy.jpg"
    Image.open(records[2].path).save(jpeg, quality=70)  # same picture, other bytes
    records.append(Record(path=str(jpeg), label="COVID", target=1, patient_id="p98",
                          split=records[2].split))  # records[2] is NORMAL
    result = audit(records)
    assert len(result.summary["near_duplicates"]) == 1
    assert result.summary["label_conflicts"][0]["labels"] == ["COVID", "NORMAL"]
    assert not result.leak  # same split: a conflict, not a leak


def test_planted_patient_leak(tmp_path):
    records = clean_set(tmp_path)
    records[1] = Record(**{**records[1].__dict__, "patient_id": records[0].patient_id})
    result = audit(records)
    assert result.summary["patient_leaks"] == {"p0": ["train", "val"]}
    assert result.leak


def test_single_class_source_and_separating_property(tmp_path):
    records = clean_set(tmp_path, n=20)
    for i in range(20, 32):  # a COVID-only source whose images are all 48x80
        path = tmp_path / f"wide{i}.png"
        Image.fromarray(smooth_image(i)[:48, :]).resize((80, 48)).save(path)
        records.append(Record(path=str(path), label="COVID", target=1, source="web",
                              split="train"))
    result = audit(records)
    assert result.summary["single_class_sources"] == {"web": "COVID"}
    assert any(f["value"] == "80x48" for f in result.summary["separating_properties"]["size"])
    text = format_audit(result)
    assert "one class only" in text and "80x48" in text


def test_unreadable_files_are_listed(tmp_path):
    records = clean_set(tmp_path)
    (tmp_path / "bad.png").write_text("x")
    records.append(Record(path=str(tmp_path / "bad.png"), label="COVID", target=1))
    assert audit(records).summary["unreadable"][0]["path"].endswith("bad.png")


def test_near_duplicate_search_matches_brute_force():
    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 256, (300, 32), dtype=np.uint8)
    hashes[5] = hashes[200]
    hashes[5, 0] ^= 1  # one bit apart
    found = near_duplicate_pairs(hashes, 100, chunk=64)
    brute = [(i, j, int(np.unpackbits(hashes[i] ^ hashes[j]).sum())) for i in range(300)
             for j in range(i + 1, 300)
             if np.unpackbits(hashes[i] ^ hashes[j]).sum() <= 100]
    assert sorted(found) == sorted(brute) and (5, 200, 1) in found


def test_difference_hash_is_stable_under_resizing():
    image = smooth_image(3, 128) / 255.0
    small = np.asarray(Image.fromarray(image.astype(np.float32), "F").resize((97, 97)))
    distance = np.unpackbits(difference_hash(image) ^ difference_hash(small)).sum()
    assert distance <= 12


def test_cli_fail_on_leak(tmp_path, capsys):
    for split in ("train", "test"):
        for label in ("COVID", "NORMAL"):
            (tmp_path / "d" / split / label).mkdir(parents=True)
    for i, (split, label) in enumerate([("train", "COVID"), ("train", "NORMAL"),
                                        ("test", "COVID"), ("test", "NORMAL")]):
        Image.fromarray(smooth_image(i)).save(tmp_path / "d" / split / label / f"{i}.png")
    out = tmp_path / "audit.json"
    assert main(["audit", str(tmp_path / "d"), "--out", str(out), "--fail-on-leak"]) == 0
    Image.fromarray(smooth_image(0)).save(tmp_path / "d" / "test" / "COVID" / "leak.png")
    assert main(["audit", str(tmp_path / "d"), "--out", str(out), "--fail-on-leak"]) == 1
    assert json.loads(out.read_text())["leak"] is True
    assert "LEAK" in capsys.readouterr().out


def test_audit_text_says_which_sources_teach_the_source(tmp_path):
    records = clean_set(tmp_path)
    records = [replace(r, source="web") if r.target else r for r in records]  # web: COVID only
    text = format_audit(audit(records, near_distance=None))
    assert "learns which source it sees" in text and "web: one class only" in text
    assert "--exclude-confounded" in text


def test_groups_are_named_on_screen_and_fail_on_sets_the_exit_code(tmp_path, capsys):
    """An unsplit folder with a label conflict: the files are named, --fail-on-leak passes
    (nothing crosses splits) and --fail-on conflict fails."""
    for label in ("COVID", "NORMAL"):
        (tmp_path / "data" / label).mkdir(parents=True)
    for i in range(6):
        Image.fromarray(smooth_image(i)).save(tmp_path / "data" / ("COVID", "NORMAL")[i % 2]
                                              / f"{i}.png")
    twin = tmp_path / "data" / "NORMAL" / "twin.png"
    twin.write_bytes((tmp_path / "data" / "COVID" / "0.png").read_bytes())
    args = ["audit", str(tmp_path / "data"), "--out", str(tmp_path / "a.json")]
    assert main(args + ["--fail-on-leak"]) == 0
    out = capsys.readouterr().out
    assert "0.png" in out and "twin.png" in out and "labels COVID/NORMAL" in out
    assert main(args + ["--fail-on", "conflict"]) == 1
    assert "conflict" in capsys.readouterr().err


def test_a_manifest_names_what_it_cannot_find_and_warns_of_a_misspelt_label(tmp_path, caplog):
    from covidxray.data.dataset import discover
    for i in range(4):
        Image.fromarray(smooth_image(i)).save(tmp_path / f"{i}.png")
    (tmp_path / "m.csv").write_text("file,label\n0.png,COVID\n1.png,NORMAL\n2.png,COVD\n"
                                    "3.png,NORMAL\nmissing.png,COVID\n")
    dataset = discover(tmp_path / "m.csv", positive_class="COVID")
    assert [r.path.endswith("missing.png") for r in dataset.records] == [False] * 4
    assert any(path.endswith("missing.png") and "not found" in reason
               for path, reason in dataset.skipped)
    assert "'COVD' (1 images) looks like a misspelling" in caplog.text
