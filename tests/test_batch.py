"""Scoring an archive: one row per file, written as it goes, resumed after a kill with each file
scored exactly once; locally and on a local Ray."""

import csv
import shutil
import signal
import subprocess
import sys
import time

import pytest
from conftest import CXR_DEV

from covidxray.api import score


def archive(folder, tiny_data, n_real=24):
    """Real X-rays (where the shared data is present) and drawn ones, with broken files among
    them, in nested folders; and a CSV list naming some of them."""
    folder.mkdir()
    (folder / "a").mkdir()
    (folder / "b" / "c").mkdir(parents=True)
    real = sorted(CXR_DEV.glob("*/*.png"))[::97][:n_real] if CXR_DEV.exists() else []
    for index, path in enumerate(real + sorted(tiny_data.rglob("*.png"))):
        shutil.copy(path, folder / ("a", "b/c")[index % 2] / f"{index:03d}.png")
    (folder / "a" / "notes.png").write_text("not an image")
    (folder / "b" / "empty.dcm").write_bytes(b"")
    return folder


def rows_of(out):
    if out.suffix == ".csv":
        return list(csv.DictReader(open(out, encoding="utf-8")))
    import pyarrow.dataset as ds
    return ds.dataset(out, format="parquet").to_table().to_pylist()


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_local_scoring_resumes_after_a_cut(tiny_run, tiny_data, tmp_path, suffix):
    files = archive(tmp_path / "in", tiny_data)
    out = tmp_path / f"results{suffix}"
    first = score(tiny_run, [files], out, chunk=8)
    rows = rows_of(out)
    assert len(rows) == first["scored"] == first["files"] and first["errors"] == 2
    assert {r["path"].rsplit("/", 1)[1] for r in rows if r["error"]} == {"notes.png",
                                                                           "empty.dcm"}
    assert all(len(r["input_sha256"]) == 64 for r in rows if r["path"].endswith("0.png"))
    if suffix == ".csv":  # a kill while a row was written: its line is cut short
        text = out.read_text()
        out.write_text(text[:text.rstrip("\n").rfind("\n") + 20])
    else:  # a kill before the last part was renamed into place
        sorted(out.glob("part-*.parquet"))[-1].unlink()
    again = score(tiny_run, [files], out, chunk=8)
    assert 0 < again["scored"] < first["scored"]
    assert again["already_done"] + again["scored"] == again["files"]
    paths = [r["path"] for r in rows_of(out)]
    assert sorted(paths) == sorted(set(paths)) and len(paths) == first["files"]


def test_a_list_of_paths_and_another_models_results(tiny_run, tiny_data, tmp_path):
    files = sorted((tiny_data / "COVID").glob("*.png"))[:3]
    listing = tmp_path / "list.csv"
    listing.write_text("path\n" + "\n".join(str(f) for f in files) + "\n")
    out = tmp_path / "r.csv"
    assert score(tiny_run, [listing], out)["scored"] == 3
    text = out.read_text().replace(rows_of(out)[0]["model_id"], "another-model")
    out.write_text(text)
    with pytest.raises(ValueError, match="another model"):
        score(tiny_run, [listing], out)


KILLABLE = """
import sys
from covidxray.api import score
score(sys.argv[1], [sys.argv[2]], sys.argv[3], engine="ray", workers=2, batch_size=4, chunk=8,
      quiet=True)
"""


@pytest.mark.slow
def test_ray_scoring_killed_half_way_resumes_each_file_once(tiny_run, tiny_data, tmp_path):
    pytest.importorskip("ray")
    files = archive(tmp_path / "in", tiny_data)
    out = tmp_path / "results.parquet"
    process = subprocess.Popen([sys.executable, "-c", KILLABLE, str(tiny_run), str(files),
                                str(out)], start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(out.glob("part-*.parquet"))) < 2:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)  # the job, half way
    process.wait()
    # the local Ray cluster the killed job started, left behind
    subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                   capture_output=True, check=False)
    before = rows_of(out)
    done = score(tiny_run, [files], out, engine="ray", workers=2, batch_size=4, chunk=8,
                 quiet=True)
    rows = rows_of(out)
    paths = [r["path"] for r in rows]
    # what was scored before is kept; a file that could not be read then is tried again
    assert before and done["already_done"] == sum(not r["error"] for r in before)
    assert done["retried"] == sum(bool(r["error"]) for r in before)
    assert len(paths) == len(set(paths)) == done["files"]  # each file exactly once
    assert sum(bool(r["error"]) for r in rows) == 2
    assert all(0 <= r["probability"] <= 1 for r in rows if not r["error"])


def test_a_cut_last_row_ending_in_a_newline_and_one_file_named_twice(tiny_run, tiny_data,
                                                                       tmp_path, monkeypatch,
                                                                       caplog):
    """A last row cut short but ended by a newline is dropped with a notice and scored again;
    a folder given once relative and once absolute is scored once."""
    files = tmp_path / "in"
    shutil.copytree(tiny_data / "COVID", files)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "r.csv"
    first = score(tiny_run, ["in", files, files / sorted(p.name for p in files.iterdir())[0]],
                  out, chunk=4)
    assert first["files"] == first["scored"] == len(list(files.glob("*.png")))
    text = out.read_text()
    last = text.rstrip("\n").rfind("\n")
    out.write_text(text[:last + 30] + "\n")  # the newline a writer might still add
    with caplog.at_level("WARNING"):
        again = score(tiny_run, ["in"], out)
    assert again["scored"] == 1 and again["already_done"] == first["files"] - 1
    assert any("last row was cut short" in r.message for r in caplog.records)
    paths = [r["path"] for r in rows_of(out)]
    assert len(paths) == len(set(paths)) == first["files"]
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:2] + [lines[2][:20]] + lines[3:]) + "\n")
    with pytest.raises(ValueError, match="line 3 is not a complete result row"):
        score(tiny_run, ["in"], out)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_file_that_failed_is_tried_again_once_it_is_whole(tiny_run, tiny_data, tmp_path,
                                                            suffix):
    """A film half-copied when the archive was scored fails; once complete, a rerun scores it
    (its error row replaced, each file once); with retry_errors off its row stays."""
    films = tmp_path / "in"
    films.mkdir()
    whole = sorted((tiny_data / "COVID").glob("*.png"))[:3]
    for film in whole:
        shutil.copy(film, films / film.name)
    half = films / whole[0].name
    half.write_bytes(whole[0].read_bytes()[:200])
    out = tmp_path / f"results{suffix}"
    first = score(tiny_run, [films], out)
    assert first["errors"] == 1 and first["scored"] == 3
    assert score(tiny_run, [films], out, retry_errors=False)["scored"] == 0
    shutil.copy(whole[0], half)  # the copy has finished
    again = score(tiny_run, [films], out)
    assert (again["retried"], again["scored"], again["errors"], again["already_done"]) == \
        (1, 1, 0, 2)
    rows = rows_of(out)
    assert len(rows) == 3 and not any(r["error"] for r in rows)


def test_symlinked_folders_are_followed_once_and_broken_links_named(tiny_run, tiny_data,
                                                                   tmp_path, caplog):
    films = tmp_path / "in"
    elsewhere = tmp_path / "elsewhere"
    films.mkdir()
    elsewhere.mkdir()
    for index, film in enumerate(sorted((tiny_data / "COVID").glob("*.png"))[:3]):
        shutil.copy(film, (films if index == 0 else elsewhere) / film.name)
    (films / "linked").symlink_to(elsewhere)
    (elsewhere / "back").symlink_to(films)  # a loop, through the link
    (films / "gone.png").symlink_to(tmp_path / "missing.png")
    out = tmp_path / "results.csv"
    done = score(tiny_run, [films], out)
    rows = {r["path"].rsplit("/", 1)[1]: r for r in rows_of(out)}
    assert done["files"] == 4 and len(rows) == 4  # 1 + 2 through the link + the broken link
    assert "cannot read file" in rows["gone.png"]["error"]
    assert "gone.png: a broken link" in caplog.text and "(a loop): skipped" in caplog.text


def test_an_output_that_cannot_be_written_is_refused_before_scoring(tiny_data, readonly_folder,
                                                                    tmp_path):
    """One line naming the folder, exit 1, before any model is loaded or built."""
    film = sorted((tiny_data / "COVID").glob("*.png"))[0]
    result = subprocess.run(
        [sys.executable, "-m", "covidxray", "predict", "lite0-cxrdev", str(film), "--out",
         str(readonly_folder / "scores.csv")], capture_output=True, text=True, timeout=120,
        env={**__import__("os").environ, "COVIDXRAY_CACHE": str(tmp_path / "empty-cache")})
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(readonly_folder) in lines[0] and "cannot write there" in \
        lines[0], result.stderr
    assert not (tmp_path / "empty-cache" / "models").exists()  # no ready model was built
