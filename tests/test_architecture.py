"""The package's floors: data flows raw -> nnU-Net -> plan -> config -> loader -> trainer -> runs/tracking ->
registry -> sampler -> NIfTI / nnU-Net export, and no module imports one of a higher floor (docs/architecture.md).

Every import is read from the source (module level and inside functions), so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "medimgen"

# lowest first; a module may import its own floor and those below. Longest prefix wins.
FLOORS = [
    ("core", ["medimgen", "medimgen.core"]),
    ("config", ["medimgen.config"]),
    ("nnunet and models", ["medimgen.nnunet", "medimgen.models"]),
    ("data", ["medimgen.data"]),
    ("planning", ["medimgen.planning"]),
    ("runs", ["medimgen.runs"]),
    ("generation", ["medimgen.generation"]),
    ("evaluation", ["medimgen.evaluation"]),
    ("training", ["medimgen.training"]),
    ("tuning", ["medimgen.tuning"]),
    ("benchmark", ["medimgen.benchmark"]),
    ("commands", ["medimgen.cli", "medimgen.demo", "medimgen.__main__"]),
]


def floor_of(module: str) -> int:
    best, level = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is on no floor: add it to FLOORS (and docs/architecture.md)"
    return level


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "medimgen"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                node.module.split(".")[0] == "medimgen":
            # `from medimgen.x import y` may import the submodule medimgen.x.y
            out |= {f"{node.module}.{a.name}" if (PACKAGE.parent / f"{node.module}.{a.name}".replace(".", "/")).exists()
                    or (PACKAGE.parent / (f"{node.module}.{a.name}".replace(".", "/") + ".py")).exists()
                    else node.module for a in node.names}
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_module_imports_a_higher_floor(path):
    me = module_name(path)
    mine = floor_of(me)
    upward = sorted(m for m in imports_of(path) if floor_of(m) > mine)
    assert not upward, (f"{me} (floor '{FLOORS[mine][0]}') imports higher floors: "
                        + ", ".join(f"{m} ('{FLOORS[floor_of(m)][0]}')" for m in upward))


def test_the_floor_check_can_fail(tmp_path):
    """A lower module that imports training is caught (the check above is not vacuous)."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from medimgen.training.ldm import LatentDiffusionTask\n")
    assert floor_of("medimgen.generation.sampler") < floor_of("medimgen.evaluation.api")
    assert any(floor_of(m) > floor_of("medimgen.runs.folders") for m in imports_of(bad))


def test_named_rules_of_the_renovation():
    """sampling/evaluation/registry/export never import training; training never imports registry or sampling."""
    for path in MODULES:
        me, deps = module_name(path), imports_of(path)
        if me.startswith(("medimgen.generation.sampler", "medimgen.evaluation", "medimgen.runs.registry", "medimgen.generation.export",
                          "medimgen.generation.pyfunc", "medimgen.runs.folders", "medimgen.models.diffusion")):
            assert not [d for d in deps if d.startswith("medimgen.training")], me
        if me.startswith("medimgen.training"):
            assert not [d for d in deps if d.startswith(("medimgen.runs.registry", "medimgen.generation.sampler"))], me


def test_every_module_sits_in_a_floor_package():
    """The folder tree is the diagram: only the commands sit flat in medimgen/, every other module is in the package
    named for its floor, and each package says in its docstring what it is."""
    flat = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert flat == ["__init__.py", "__main__.py", "cli.py", "demo.py"], flat
    packages = [name for _, prefixes in FLOORS for name in prefixes if name.count(".") == 1 and
                (PACKAGE.parent / name.replace(".", "/")).is_dir()]
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == \
        {n.split(".")[1] for n in packages}
    for name in packages:
        doc = ast.get_docstring(ast.parse((PACKAGE.parent / name.replace(".", "/") / "__init__.py").read_text()))
        assert doc, f"{name} has no docstring"
