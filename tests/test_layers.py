"""The package's layers point down: a module imports only from its own package or a lower layer.

Every module of ``src/mambaxray_ctl`` is read with ``ast`` (nothing is imported): its ``import`` and
``from ... import`` statements, at module level and inside functions, relative ones resolved. Imports
under ``if TYPE_CHECKING:`` are skipped (they never run). ``mambaxray_ctl/__init__.py`` is neutral.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

PACKAGE = "mambaxray_ctl"
ROOT = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# Layer -> its units (top-level packages and modules of mambaxray_ctl), lowest first. A unit imports
# freely from itself; peers (units of the same layer) may not import each other.
LAYERS: dict[int, tuple[str, ...]] = {
    0: ("compat", "distributed", "hardware", "logs", "provenance"),  # foundation: single modules
    1: ("ops",),  # the selective scan and its implementations
    2: ("backbone",),  # Vision Mamba: config, layers, checkpoints
    3: ("data", "text"),  # datasets and DataModules | the text models (peers)
    4: ("metrics",),  # report metrics, clinical efficacy with the Labeler interface, retrieval
    5: ("stages",),  # the LightningModules of the training stages
    6: ("callbacks",),  # Lightning callbacks: predictions, TensorBoard, embeddings
    7: ("evaluation",),  # the evaluate / generate commands and the notebooks' helpers
    8: ("lightning_cli",),  # the LightningCLI of fit / validate / test / predict
    9: ("pipeline",),  # the stages run one after another
    10: ("demo",),  # the synthetic world and the demo built on it
    11: ("profile",),  # the paper-size profiling tool
    12: ("cli", "__main__"),  # the mambaxray-ctl command
}
SAME_UNIT = {"__main__": "cli"}  # ``python -m mambaxray_ctl`` runs the command
LAYER_OF = {unit: layer for layer, units in LAYERS.items() for unit in units}

# Modules outside mambaxray_ctl.demo that import it (all above it in LAYERS), with the reason.
DEMO_USERS = {
    "mambaxray_ctl.profile.models": "trains the paper-size tokenizers on the synthetic world's reports",
}

Sources = Mapping[str, tuple[str, bool]]  # module name -> (source text, is a package __init__)


def package_sources() -> dict[str, tuple[str, bool]]:
    sources = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        name = ".".join(parts[:-1] if is_package else parts)
        sources[name] = (path.read_text(encoding="utf-8"), is_package)
    return sources


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node under ``node`` but those in the body of an ``if TYPE_CHECKING:`` (its ``else`` counts)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.orelse:
                yield stmt
                yield from _nodes(stmt)
            continue
        yield child
        yield from _nodes(child)


def imports(name: str, source: str, is_package: bool, known: set[str]) -> set[str]:
    """The modules of the package that module ``name`` imports (``from pkg import mod`` gives
    ``pkg.mod`` when that is a module in ``known``, else ``pkg``)."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in _nodes(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            submodules = {f"{target}.{alias.name}" for alias in node.names} & known
            found |= submodules or {target}
    return {target for target in found if target == PACKAGE or target.startswith(f"{PACKAGE}.")}


def unit_of(name: str) -> str | None:
    """``mambaxray_ctl.data.cleaning`` -> ``data``; None for the neutral ``mambaxray_ctl``."""
    parts = name.split(".")
    return SAME_UNIT.get(parts[1], parts[1]) if len(parts) > 1 else None


def import_edges(sources: Sources) -> Iterator[tuple[str, str]]:
    known = set(sources)
    for name, (source, is_package) in sources.items():
        for target in sorted(imports(name, source, is_package, known)):
            yield name, target


def layer_violations(sources: Sources) -> list[str]:
    """``"a -> b: layer X imports layer Y"`` for every edge to a peer or an upper layer."""
    problems = []
    for name, target in import_edges(sources):
        source_unit, target_unit = unit_of(name), unit_of(target)
        if None in (source_unit, target_unit) or source_unit == target_unit:
            continue
        if source_unit not in LAYER_OF or target_unit not in LAYER_OF:
            continue  # reported by test_every_module_belongs_to_a_layer
        low, high = LAYER_OF[source_unit], LAYER_OF[target_unit]
        if high >= low:
            problems.append(f"{name} -> {target}: layer {low} imports layer {high}")
    return problems


def demo_importers(sources: Sources) -> dict[str, list[str]]:
    """Modules outside ``mambaxray_ctl.demo`` -> the demo modules they import."""
    found: dict[str, list[str]] = {}
    for name, target in import_edges(sources):
        if unit_of(name) != "demo" and unit_of(target) == "demo":
            found.setdefault(name, []).append(target)
    return found


def test_every_module_belongs_to_a_layer() -> None:
    units = {unit_of(name) for name in package_sources()} - {None}
    unplaced = sorted(unit for unit in units if unit not in LAYER_OF)
    assert not unplaced, f"place these in LAYERS ({__file__}): {unplaced}"


def test_imports_point_down() -> None:
    problems = layer_violations(package_sources())
    assert not problems, "imports against the layers:\n" + "\n".join(problems)


def test_nothing_outside_the_demo_imports_it() -> None:
    importers = demo_importers(package_sources())
    unexpected = {name: targets for name, targets in importers.items() if name not in DEMO_USERS}
    assert not unexpected, f"modules outside mambaxray_ctl.demo that import it: {unexpected}"
    stale = sorted(set(DEMO_USERS) - set(importers))
    assert not stale, f"DEMO_USERS lists modules that no longer import the demo: {stale}"


def test_the_checker_finds_upward_and_peer_edges() -> None:
    """The walk itself: relative, function-level and ``else``-of-TYPE_CHECKING imports count; imports
    under ``if TYPE_CHECKING:`` and the neutral root do not."""
    fake = (
        "from typing import TYPE_CHECKING\n"
        "import mambaxray_ctl\n"
        "from . import images\n"  # own package
        "from .. import compat\n"  # layer 0
        "from ..text import llm\n"  # peer
        "if TYPE_CHECKING:\n"
        "    from mambaxray_ctl.stages.base import BackboneStage\n"
        "else:\n"
        "    import mambaxray_ctl.metrics.report\n"  # upper
        "def f():\n"
        "    from mambaxray_ctl.demo.world import generate_world\n"  # upper, and the demo
    )
    sources = package_sources()
    assert "mambaxray_ctl.data.images" in sources and "mambaxray_ctl.text.llm" in sources
    sources["mambaxray_ctl.data.fake"] = (fake, False)
    name = "mambaxray_ctl.data.fake"
    assert sorted(imports(name, fake, False, set(sources))) == [
        "mambaxray_ctl",
        "mambaxray_ctl.compat",
        "mambaxray_ctl.data.images",
        "mambaxray_ctl.demo.world",
        "mambaxray_ctl.metrics.report",
        "mambaxray_ctl.text.llm",
    ]
    assert [p for p in layer_violations(sources) if p.startswith(name)] == [
        f"{name} -> mambaxray_ctl.demo.world: layer 3 imports layer 10",
        f"{name} -> mambaxray_ctl.metrics.report: layer 3 imports layer 4",
        f"{name} -> mambaxray_ctl.text.llm: layer 3 imports layer 3",
    ]
    assert demo_importers(sources)[name] == ["mambaxray_ctl.demo.world"]
