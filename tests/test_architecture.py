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
    ("base", ["medimgen", "medimgen.errors", "medimgen.atomic", "medimgen.paths", "medimgen.devices",
              "medimgen.requests", "medimgen.distributed"]),
    ("config", ["medimgen.config"]),
    ("building blocks", ["medimgen.plans", "medimgen.networks", "medimgen.diffusion", "medimgen.decoding", "medimgen.losses", "medimgen.labels",
                         "medimgen.weights", "medimgen.perceptual", "medimgen.synthetic", "medimgen.importer"]),
    ("data and planning", ["medimgen.data", "medimgen.geometry", "medimgen.planning", "medimgen.nnunet",
                           "medimgen.nnunet_trainers", "medimgen.conditioning"]),
    ("runs and tracking", ["medimgen.tracking", "medimgen.runs"]),
    ("training", ["medimgen.training"]),
    ("sampling", ["medimgen.sampling"]),
    ("registry, evaluation, export", ["medimgen.registry", "medimgen.mlflow_model", "medimgen.evaluation",
                                      "medimgen.export", "medimgen.segbench"]),
    ("tuning", ["medimgen.tuning"]),
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
    assert floor_of("medimgen.sampling") < floor_of("medimgen.evaluation.api")
    assert any(floor_of(m) > floor_of("medimgen.runs") for m in imports_of(bad))


def test_named_rules_of_the_renovation():
    """sampling/evaluation/registry/export never import training; training never imports registry or sampling."""
    for path in MODULES:
        me, deps = module_name(path), imports_of(path)
        if me.startswith(("medimgen.sampling", "medimgen.evaluation", "medimgen.registry", "medimgen.export",
                          "medimgen.mlflow_model", "medimgen.runs", "medimgen.diffusion")):
            assert not [d for d in deps if d.startswith("medimgen.training")], me
        if me.startswith("medimgen.training"):
            assert not [d for d in deps if d.startswith(("medimgen.registry", "medimgen.sampling"))], me
