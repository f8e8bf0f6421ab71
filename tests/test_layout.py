"""The package's import rules (../shared/DESIGN.md, with the deviations README names): nothing
imports upward, ``cli`` only goes through ``api``, nothing imports ``cli``, ``api`` or
``deploy``."""

import ast
from pathlib import Path

import covidxray

PACKAGE = Path(covidxray.__file__).parent
LEAVES = {"config", "fileutil", "progress", "version"}
ALLOWED = {
    "config": {"fileutil"},
    "fileutil": set(),
    "version": set(),
    "progress": set(),
    "pixels": LEAVES,
    "data": {"pixels"} | LEAVES,
    "model": LEAVES,
    "model.lungs": {"pixels"} | LEAVES,  # reads image/mask pairs, prepares its own input
    "training": {"data", "model", "pixels", "run", "evaluation.metrics"} | LEAVES,
    "run": {"model", "pixels"} | LEAVES,
    "evaluation": {"run", "data", "pixels"} | LEAVES,
    "evaluation.crossval": {"run", "data", "pixels", "training"} | LEAVES,
    "deploy": {"run", "evaluation.explain"} | LEAVES,
    "api": {"config", "model", "data", "training", "run", "evaluation", "deploy", "fileutil",
            "pixels"},
    "cli": {"api"},
}


def unit(module: str) -> str:
    """The rule a module answers to: its own entry if it has one, else its package's."""
    return module if module in ALLOWED else module.split(".")[0]


def imported(path: Path) -> set[str]:
    """covidxray modules a file imports, at the top or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                "covidxray."):
            names.add(node.module.removeprefix("covidxray."))
            names |= {f"{node.module.removeprefix('covidxray.')}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name.removeprefix("covidxray.") for a in node.names
                      if a.name.startswith("covidxray.")}
    return names


def test_every_import_follows_the_rules():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module in ("__init__", "__main__"):
            continue
        own = module.split(".")[0]
        allowed = ALLOWED[unit(module)] | {own}
        for name in imported(path):
            target = name.split(".")
            if not any(".".join(target[:k]) in allowed for k in range(1, len(target) + 1)):
                broken.append(f"{module} imports {name}")
    assert broken == []
