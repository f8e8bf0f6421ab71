"""The package's import rules (../shared/DESIGN.md, with the deviations README names): nothing
imports upward, ``cli`` only goes through ``api``, nothing imports ``cli``, ``api`` or
``deploy``."""

import ast
from pathlib import Path

import covidxray

PACKAGE = Path(covidxray.__file__).parent
# modules with no covidxray import of their own (model.backend: Keras' backend, set before
# any module imports Keras)
LEAVES = {"config", "errors", "fileutil", "progress", "version", "model.backend", "metrics"}
ALLOWED = {
    "config": {"fileutil", "errors"},
    "fileutil": {"errors"},
    "metrics": set(),  # pure numpy / scikit-learn: what training and evaluation both use
    "errors": set(),
    "version": set(),
    "progress": set(),
    "pixels": LEAVES,
    "data": {"pixels"} | LEAVES,
    "model": LEAVES,
    # the segmenter prepares its own input and hands back pixels.lungfield's LungField
    "model.lungs": {"pixels"} | LEAVES,
    "training": {"data", "model", "pixels", "run"} | LEAVES,
    # the run folder reads and writes its split.csv through the one reader of that format
    "run": {"model", "pixels", "data.split"} | LEAVES,
    "evaluation": {"run", "data", "pixels"} | LEAVES,
    "evaluation.crossval": {"run", "data", "pixels", "training"} | LEAVES,
    "deploy": {"run", "evaluation.explain"} | LEAVES,
    "api": {"config", "model", "data", "training", "run", "evaluation", "deploy", "pixels"}
    | LEAVES,
    "cli": {"api"},
}


# what ``from covidxray import NAME`` imports: the root hands out the api's functions
ROOT_NAMES = {name: "api" for name in covidxray.__all__ if name != "__version__"}


def unit(module: str) -> str:
    """The rule a module answers to: its own entry if it has one, else its package's."""
    return module if module in ALLOWED else module.split(".")[0]


def imported(path: Path, module: str = "") -> set[str]:
    """covidxray modules a file imports, at the top or inside functions, in every form:
    ``import covidxray.x``, ``from covidxray.x import y``, ``from covidxray import x`` (the
    root's names are the modules or the api functions it hands out) and relative imports."""
    names = set()
    package = module.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = package[:len(package) - node.level + 1]
                source = ".".join(["covidxray", *base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            if source == "covidxray":
                names |= {ROOT_NAMES.get(a.name, a.name) for a in node.names
                          if a.name != "__version__"}
            elif source.startswith("covidxray."):
                names.add(source.removeprefix("covidxray."))
                names |= {f"{source.removeprefix('covidxray.')}.{a.name}" for a in node.names}
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
        for name in imported(path, module):
            target = name.split(".")
            if not any(".".join(target[:k]) in allowed for k in range(1, len(target) + 1)):
                broken.append(f"{module} imports {name}")
    assert broken == []


def test_the_root_imports_nothing_heavy_and_sets_nothing():
    """``import covidxray`` (and the command line's parser) loads no deep-learning library and
    leaves the environment alone; the public functions come on first use."""
    import subprocess
    import sys
    code = ("import os, sys; before = dict(os.environ); import covidxray, covidxray.cli; "
            "covidxray.cli.build_parser(); "
            "heavy = [m for m in ('keras', 'torch', 'jax', 'tensorflow', 'sklearn', 'scipy') "
            "if m in sys.modules]; "
            "assert not heavy, heavy; assert dict(os.environ) == before; "
            "assert callable(covidxray.load) and 'keras' not in sys.modules")
    env = {k: v for k, v in __import__("os").environ.items() if k != "KERAS_BACKEND"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr


def test_the_layout_test_sees_every_import_form(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("from covidxray import api\nfrom . import network\n"
                      "from ..run import folder\nimport covidxray.deploy.batch\n")
    assert imported(source, "model.lungs") >= {"api", "model.network", "run.folder",
                                               "deploy.batch"}


def test_no_two_packages_import_each_other():
    """The packages form no cycle (training once imported evaluation's metrics while
    evaluation's cross-validation imported training)."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        if module in ("__init__", "__main__"):
            continue
        own = module.split(".")[0]
        graph.setdefault(own, set()).update(
            name.split(".")[0] for name in imported(path, module) if name.split(".")[0] != own)

    def reaches(start, goal, seen=()):
        return any(step == goal or (step not in seen and reaches(step, goal, (*seen, step)))
                   for step in graph.get(start, ()))
    cycles = sorted(p for p in graph if reaches(p, p))
    assert cycles == [], {p: sorted(graph[p]) for p in cycles}
