"""Write reference/cli.md from covidxray's own argument parser (run by mkdocs-gen-files).

Every command, nested ones included (``lungs train``, ``data download``), gets its usage and
every option with its help text, as ``covidxray COMMAND --help`` prints them. Building the
parser imports no deep-learning library (``covidxray.cli`` promises it), so neither does this.
Run alone (``python docs/gen_cli_reference.py``) it prints the page instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

PAGE = "reference/cli.md"
WIDTH = "100"  # help text wrapped at this many columns, whatever the terminal


def commands(parser: argparse.ArgumentParser,
             name: str) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """The parser, then each sub-command's, depth first, in the order they were added."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub_parser in action.choices.items():
                yield from commands(sub_parser, f"{name} {sub_name}")


def anchor(name: str) -> str:
    return name.replace(" ", "-")


def page() -> str:
    source = Path(__file__).resolve().parents[1] / "src"
    if source.is_dir() and str(source) not in sys.path:
        sys.path.insert(0, str(source))
    from covidxray.cli import build_parser

    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = WIDTH
    try:
        found = list(commands(build_parser(), "covidxray"))
        helps = [(name, parser.format_help().rstrip()) for name, parser in found]
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before
    lines = ["# Command line",
             "",
             "Generated from covidxray's own argument parser when the site is built "
             "(`docs/gen_cli_reference.py`): each block is what `covidxray COMMAND --help` "
             "prints. The [guide](../guide/index.md) explains what the commands do.",
             "",
             "An option a command is not given is not passed on: the default of "
             "`covidxray.config` applies, and the help names it. Exit status: 0 success, 1 the "
             "job failed (or, for `predict` and `explain`, some files could not be read), 2 "
             "usage errors, 130 interrupted.",
             "",
             "Commands: " + ", ".join(f"[`{name.removeprefix('covidxray ')}`](#{anchor(name)})"
                                     for name, _ in found[1:]),
             ""]
    for name, text in helps:
        lines += [f"## {name} {{#{anchor(name)}}}", "", "```text", text, "```", ""]
    return "\n".join(lines)


def write() -> None:
    """The page into the site being built (mkdocs-gen-files runs this file, not as __main__)."""
    import mkdocs_gen_files

    with mkdocs_gen_files.open(PAGE, "w") as out:
        out.write(page())
    mkdocs_gen_files.set_edit_path(PAGE, "gen_cli_reference.py")


if __name__ == "__main__":
    print(page())
else:
    write()
