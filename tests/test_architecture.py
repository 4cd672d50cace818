"""The package's shape, checked from the source: imports flow one way (no cycle), Ray stays in
orchestrator/sweep.py, the job client in orchestrator/cluster.py and prepare-data's Ray Data runner in
orchestrator/prepare_ray.py, MLflow stays in
orchestrator/tracking.py, and trainer/ knows neither of them nor the orchestrator.

Imports are read with `ast`, so imports hidden inside functions count as much as top-level ones.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "orchestrator")
# Ray Tune (sweep), the job-submission client (cluster), and Ray Data for prepare-data (prepare_ray:
# decoding shards across a cluster is Ray Data's job, not Tune's, and needs no Tune callbacks).
RAY_MODULES = {"orchestrator.sweep", "orchestrator.cluster", "orchestrator.prepare_ray"}
MLFLOW_MODULES = {"orchestrator.tracking"}


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            found[name] = path
    return found


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement in the file names, at any depth of the tree."""
    names: set[str] = set()
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from orchestrator import sweep`
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    ours = modules()
    return {
        module: {name for name in imported_names(path, module) if name in ours and name != module}
        for module, path in ours.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path [a, b, ..., a], or None (depth-first search with colours)."""
    colour = dict.fromkeys(graph, "white")
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if colour[nxt] == "white" and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        colour[node] = "black"
        return None

    for node in sorted(graph):
        if colour[node] == "white" and (cycle := visit(node)):
            return cycle
    return None


def importers_of(top_level: str) -> set[str]:
    return {
        module for module, path in modules().items()
        if any(name == top_level or name.startswith(top_level + ".") for name in imported_names(path, module))
    }


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle():
    graph = import_graph()
    assert "orchestrator.launch" in graph and "trainer.train" in graph  # the walk saw the packages
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_ray_only_in_sweep_the_job_client_and_the_ray_data_runner():
    assert importers_of("ray") <= RAY_MODULES, importers_of("ray") - RAY_MODULES
    assert "orchestrator.sweep" in importers_of("ray")


def test_mlflow_only_in_tracking():
    assert importers_of("mlflow") == MLFLOW_MODULES


def test_trainer_imports_no_ray_mlflow_or_orchestrator():
    for forbidden in ("ray", "mlflow", "orchestrator"):
        assert not {m for m in importers_of(forbidden) if m.startswith("trainer")}, forbidden


def string_literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def test_tracking_owns_every_run_tag_name():
    """MLflow tag names are spelled in tracking.py only (cluster.py's `ditsweep.` keys are Ray Job
    metadata, not MLflow tags)."""
    for module, path in modules().items():
        if module in ("orchestrator.tracking", "orchestrator.cluster"):
            continue
        spelled = {s for s in string_literals(path) if s.startswith(("ditsweep.", "mlflow."))}
        assert not spelled, f"{module} spells tag names {spelled}; use orchestrator.tracking's"


def test_no_mlflow_client_outside_tracking():
    for module, path in modules().items():
        if module == "orchestrator.tracking":
            continue
        reaches = {node.attr for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Attribute) and node.attr in ("client", "_client")}
        assert not reaches, f"{module} reaches for the tracker's MLflow client"


def test_no_test_module_imports_another():
    """Tests share fixtures (conftest.py) and helpers (tests/support), never one another's modules."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        names = imported_names(path, f"tests.{path.stem}")
        assert not {n for n in names if n.startswith("tests.test_")}, path.name
