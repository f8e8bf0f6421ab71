"""The documentation: the manual builds with --strict (no broken link or reference), and every
code block of the README and of the guide's tutorial pages runs as written."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOT_RUN = "<!-- not run by the tests"
# the pages whose code blocks are a tutorial to follow as written
TUTORIALS = [ROOT / "README.md", *sorted((ROOT / "docs" / "tutorial").glob("*.md"))]


def code_blocks(page: Path) -> list[tuple[str, str]]:
    """(language, code) of every fenced block of ``page`` not marked as not run."""
    blocks, lines = [], page.read_text().splitlines()
    index = 0
    while index < len(lines):
        opening = re.match(r"^```(\w+)\s*$", lines[index])
        if opening:
            end = lines.index("```", index + 1)
            marked = index > 0 and lines[index - 1].startswith(NOT_RUN)
            if not marked:
                blocks.append((opening.group(1), "\n".join(lines[index + 1:end])))
            index = end
        index += 1
    return blocks


@pytest.mark.skipif(shutil.which("mkdocs") is None and not (Path(sys.executable).parent /
                                                           "mkdocs").exists(),
                    reason="mkdocs is not installed (the test extra installs it)")
def test_the_manual_builds_strict(tmp_path):
    mkdocs = shutil.which("mkdocs") or str(Path(sys.executable).parent / "mkdocs")
    built = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")],
                           cwd=ROOT, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "DISABLE_MKDOCS_2_WARNING": "true",
                                "NO_MKDOCS_2_WARNING": "1"})
    assert built.returncode == 0, built.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "cli" / "index.html").is_file()
    cli = (tmp_path / "site" / "reference" / "cli" / "index.html").read_text()
    assert "--fill" in cli and "dicom-node" in cli


@pytest.mark.slow
@pytest.mark.parametrize("page", TUTORIALS, ids=lambda p: p.name)
def test_every_code_block_runs_as_written(page, tmp_path):
    """In a folder holding ``film.png`` (a drawn film), with the installed package."""
    from covidxray.data.synthetic import reference_films
    shutil.copy(reference_films(tmp_path / "films")["drawn-frontal"], tmp_path / "film.png")
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    blocks = code_blocks(page)
    assert blocks, f"{page.name} has no code block to run"
    for language, code in blocks:
        if language == "python":
            command = [sys.executable, "-c", code]
        elif language in ("bash", "sh", "console"):
            command = ["bash", "-euo", "pipefail", "-c", code]
        else:
            continue
        done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, f"{page.name}:\n{code}\n{done.stderr[-3000:]}"
