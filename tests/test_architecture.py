"""The house rules of issue 12 as checks anyone can run (``pytest tests/test_architecture.py``).

- layers only point down: every ``segcalib`` import (module-level or inside a function, absolute
  or relative) goes to a layer the map below allows; the map is the table of
  ``docs/architecture.md``, and a test keeps the two equal;
- nothing below training imports ``segcalib.training``;
- every file under ``segcalib/`` has at most 450 lines;
- the region names are string literals in one module only, ``segcalib/spatial/regions.py``.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

from segcalib.spatial.regions import ALL, BOUNDARY, FOREGROUND, available_regions

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "segcalib"
MAX_LINES = 450

# Which layer may import which (besides itself). Keys are packages of segcalib (or one module,
# where a package's modules sit on different layers: the config schema is a leaf, its loader
# checks parameters in the loss and model registries); "segcalib" is the root package, which holds
# only ``__version__``. The same table stands in docs/architecture.md.
BASE = {"segcalib", "errors", "utils"}
ALLOWED: dict[str, set[str]] = {
    "segcalib": set(),
    "errors": set(),
    "utils": {"errors"},
    "spatial": {"errors", "utils"},
    "config.schema": {"errors"},
    "models": BASE,
    "losses": BASE | {"spatial"},
    "metrics": BASE | {"spatial"},
    "data": BASE | {"spatial", "config.schema"},
    "runs": set(BASE),
    "config": BASE | {"models", "losses"},
    "predictions": BASE | {"spatial", "data"},
    "inference": BASE | {"spatial", "config", "data", "models", "runs"},
    "calibrators": BASE | {"spatial", "data", "metrics", "predictions", "inference"},
    "conformal": BASE | {"spatial", "data", "predictions"},
    "training": BASE | {"spatial", "config", "data", "models", "losses", "metrics", "runs", "inference"},
    "export": BASE | {"spatial", "data", "predictions", "inference", "calibrators"},
    "reports": BASE | {"spatial", "data", "metrics", "predictions", "export", "conformal"},
    "integrations": BASE | {"config", "losses"},  # nnU-Net trainers; only the CLI imports them
}
ALLOWED["experiment"] = set(ALLOWED) - {"experiment", "integrations"}  # the study runner: every layer above
ALLOWED["cli"] = set(ALLOWED)  # the commands: everything
ALLOWED["__main__"] = {"cli"}

# The issue's own list: these never import segcalib.training (it sits above all of them).
BELOW_TRAINING = ("inference", "export", "metrics", "data", "models", "losses", "spatial", "predictions", "calibrators",
                  "conformal")


def module_name(path: Path) -> str:
    """``segcalib/a/b.py`` -> ``segcalib.a.b``; a package's ``__init__.py`` -> the package."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of the working tree."""
    base = REPO.joinpath(*dotted.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imported_modules(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """Every ``(line, dotted name)`` that ``source`` imports, at any depth (functions included).

    Relative imports are resolved against ``module``; ``from P import name`` gives ``P.name`` where
    that is a module of the tree, else ``P``.
    """
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if is_module(sub) else base))
    return found


def layer_of(dotted: str) -> str | None:
    """The key of ``ALLOWED`` that holds segcalib module ``dotted`` (None outside segcalib)."""
    parts = dotted.split(".")
    if parts[0] != "segcalib":
        return None
    for depth in range(len(parts), 1, -1):
        key = ".".join(parts[1:depth])
        if key in ALLOWED:
            return key
    return "segcalib" if len(parts) == 1 else parts[1]


@lru_cache(maxsize=None)
def package_imports() -> tuple[tuple[str, int, str], ...]:
    """``(file, line, imported module)`` for every segcalib import in the package."""
    rows = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        for line, target in imported_modules(path.read_text(), module, path.name == "__init__.py"):
            if target == "segcalib" or target.startswith("segcalib."):
                rows.append((str(path.relative_to(REPO)), line, target))
    return tuple(rows)


def source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


# ---------------------------------------------------------------------------------------------
# the checker itself finds what it must (so a pass below means something)


def test_import_parser_sees_function_level_and_relative_imports() -> None:
    source = (
        "import os\n"
        "from segcalib.errors import DataError\n"
        "def f():\n"
        "    from ..training import trainer\n"
        "    import segcalib.training.validation as v\n"
        "    from . import temperature\n"
    )
    found = imported_modules(source, "segcalib.inference.sliding_window")
    assert found == [
        (1, "os"),
        (2, "segcalib.errors"),
        (4, "segcalib.training.trainer"),
        (5, "segcalib.training.validation"),
        (6, "segcalib.inference.temperature"),
    ]
    # in a package's __init__, "." is the package itself
    assert imported_modules("from .schema import DataConfig", "segcalib.config", True) == [
        (1, "segcalib.config.schema")
    ]


def test_layer_of_takes_the_most_specific_key() -> None:
    assert layer_of("segcalib.config.schema") == "config.schema"
    assert layer_of("segcalib.config.loader") == "config"
    assert layer_of("segcalib.config") == "config"
    assert layer_of("segcalib") == "segcalib"
    assert layer_of("segcalib.metrics.calibration") == "metrics"
    assert layer_of("torch.nn") is None


# ---------------------------------------------------------------------------------------------
# the rules


@pytest.mark.parametrize("package", BELOW_TRAINING)
def test_no_layer_below_training_imports_training(package: str) -> None:
    assert (PACKAGE / package).is_dir(), f"segcalib/{package} is listed but does not exist"
    offenders = [
        f"{path}:{line} imports {target}"
        for path, line, target in package_imports()
        if path.startswith(f"segcalib/{package}/") and layer_of(target) == "training"
    ]
    assert offenders == []


def test_every_package_has_a_place_in_the_layer_map() -> None:
    layers = {layer_of(module_name(path)) for path in source_files()}
    assert layers - set(ALLOWED) == set(), "add the new package to ALLOWED and docs/architecture.md"


def test_layer_map_points_down_only() -> None:
    """The allowed imports form no cycle (a layer never reaches itself through others)."""
    done: set[str] = set()

    def visit(layer: str, path: tuple[str, ...]) -> None:
        assert layer not in path, f"cycle in ALLOWED: {' -> '.join(path + (layer,))}"
        if layer in done:
            return
        for below in ALLOWED[layer]:
            visit(below, path + (layer,))
        done.add(layer)

    for layer in ALLOWED:
        visit(layer, ())


def may_import(source: str, dest: str) -> bool:
    """Whether layer ``source`` may import layer ``dest`` (a layer includes its own sub-keys)."""
    return any(dest == key or dest.startswith(key + ".") for key in ALLOWED[source] | {source})


def test_may_import_follows_the_map() -> None:
    assert may_import("training", "config.schema")  # "config" allows its schema
    assert may_import("config", "config.schema")  # a package uses its own modules
    assert not may_import("config.schema", "config")  # the schema stays a leaf
    assert not may_import("data", "config")  # data reads the schema only
    assert not may_import("metrics", "training")


def test_every_import_follows_the_layer_map() -> None:
    offenders = []
    for path, line, target in package_imports():
        source, dest = layer_of(module_name(REPO / path)), layer_of(target)
        if not may_import(source, dest):
            offenders.append(f"{path}:{line} ({source}) imports {target} ({dest})")
    assert offenders == []


def test_layer_map_is_the_table_of_the_architecture_doc() -> None:
    """docs/architecture.md shows the same map: rows ``| `layer` | `a`, `b` |``."""
    text = (REPO / "docs" / "architecture.md").read_text()
    rows = re.findall(r"^\|\s*`([\w.]+)`\s*\|([^|\n]*)\|", text, flags=re.MULTILINE)
    documented = {layer: set(re.findall(r"`([\w.]+)`", allowed)) for layer, allowed in rows}
    documented = {layer: allowed - {"everything"} for layer, allowed in documented.items()}
    expected = {layer: set(allowed) for layer, allowed in ALLOWED.items() if layer not in ("cli", "experiment")}
    assert {k: v for k, v in documented.items() if k in expected} == expected
    assert {"cli", "experiment"} <= set(documented)


def test_no_file_in_the_package_is_longer_than_450_lines() -> None:
    too_long = {}
    for path in source_files():
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            too_long[str(path.relative_to(REPO))] = lines
    assert too_long == {}


def string_literals(source: str) -> list[tuple[int, str]]:
    """``(line, value)`` of every str constant in ``source`` that is not a docstring.

    A string standing alone as a statement (module, class or function docstring, or an attribute
    docstring) does not count; f-string pieces do.
    """
    tree = ast.parse(source)
    standalone = {
        id(node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in standalone
    ]


def test_string_literal_finder_skips_docstrings_only() -> None:
    source = '"""all"""\ndef f():\n    """foreground"""\n    return ["boundary", f"{1}all"]\n'
    assert string_literals(source) == [(4, "boundary"), (4, "all")]


def test_region_names_are_literals_in_the_regions_module_only() -> None:
    names = set(available_regions())
    assert {ALL, FOREGROUND, BOUNDARY} <= names
    where: dict[str, list[str]] = {}
    for path in source_files():
        for line, value in string_literals(path.read_text()):
            if value in names:
                where.setdefault(str(path.relative_to(REPO)), []).append(f"{line}:{value}")
    assert set(where) == {"segcalib/spatial/regions.py"}, where
