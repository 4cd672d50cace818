"""The package's shape, checked from the source against docs/ARCHITECTURE.md: imports point down the
doc's list of layers (read from the doc, so the doc and the code cannot drift apart), no cycle, Ray
stays in orchestrator/sweep.py, the job client in orchestrator/cluster.py and prepare-data's Ray Data
runner in orchestrator/prepare_ray.py, MLflow stays in the package orchestrator/tracking/, trainer/
knows neither of them nor the orchestrator, and the doc's module tables name every module of
orchestrator/, trainer/ and benchmarks/ and nothing that is gone.

Imports are read with `ast`, so imports hidden inside functions count as much as top-level ones.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "ARCHITECTURE.md"
PACKAGES = ("trainer", "orchestrator")
# Ray Tune (sweep), the job-submission client (cluster), and Ray Data for prepare-data (prepare_ray:
# decoding shards across a cluster is Ray Data's job, not Tune's, and needs no Tune callbacks).
RAY_MODULES = {"orchestrator.sweep", "orchestrator.ray_connect", "orchestrator.cluster", "orchestrator.prepare_ray"}
MLFLOW_PACKAGE = "orchestrator.tracking"  # the one door to MLflow: this package's modules only


def modules(packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Dotted name -> file of every module of the packages, subpackages included (a package is its
    `__init__.py`)."""
    found = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def import_statements(path: Path, module: str) -> list[tuple[str, list[str]]]:
    """Every import statement of the file, at any depth of the tree, as (module, names): `import a.b`
    is ("a.b", []), `from a import b, c` is ("a", ["b", "c"]), relative imports resolved."""
    statements = []
    package = module if path.stem == "__init__" else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            statements += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            statements.append((base, [alias.name for alias in node.names]))
    return statements


def imported_names(path: Path, module: str) -> set[str]:
    """Every module name an import statement in the file names (`from orchestrator import sweep`:
    orchestrator, orchestrator.sweep), for the checks on Ray and MLflow."""
    return {name for base, names in import_statements(path, module) for name in (base, *(f"{base}.{n}" for n in names))}


def imported_modules(path: Path, module: str, ours: dict[str, Path]) -> set[str]:
    """Our modules a file imports: `from orchestrator import launch` is orchestrator.launch (not the
    package orchestrator, whose __init__ it also runs), `from orchestrator.spec import Trial` is
    orchestrator.spec."""
    found: set[str] = set()
    for base, names in import_statements(path, module):
        found |= {f"{base}.{name}" for name in names} & ours.keys() or {base}
    return {name for name in found if name in ours and name != module}


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    ours = modules()
    return {module: imported_modules(path, module, ours) for module, path in ours.items()}


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


def in_tracking(module: str) -> bool:
    return module == MLFLOW_PACKAGE or module.startswith(MLFLOW_PACKAGE + ".")


def test_mlflow_only_in_tracking():
    importers = importers_of("mlflow")
    assert {m for m in importers if not in_tracking(m)} == set()
    assert {"orchestrator.tracking.tracker", "orchestrator.tracking.writes"} <= importers  # the walk saw it


def test_the_packages_import_no_tests_or_benchmarks():
    """tests/ and benchmarks/ sit above every layer: they import the packages, never the reverse."""
    for top_level in ("tests", "benchmarks"):
        assert not importers_of(top_level), (top_level, importers_of(top_level))


def test_trainer_imports_no_ray_mlflow_or_orchestrator():
    for forbidden in ("ray", "mlflow", "orchestrator"):
        assert not {m for m in importers_of(forbidden) if m.startswith("trainer")}, forbidden


def string_literals(path: Path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Constant)
            and isinstance(node.value, str)}


def test_tracking_owns_every_run_tag_name():
    """MLflow tag names are spelled in orchestrator/tracking/ only (cluster.py's `ditsweep.` keys are Ray
    Job metadata, not MLflow tags)."""
    for module, path in modules().items():
        if in_tracking(module) or module == "orchestrator.cluster":
            continue
        spelled = {s for s in string_literals(path) if s.startswith(("ditsweep.", "mlflow."))}
        assert not spelled, f"{module} spells tag names {spelled}; use orchestrator.tracking's"


def test_no_mlflow_client_outside_tracking():
    for module, path in modules().items():
        if in_tracking(module):
            continue
        reaches = {node.attr for node in ast.walk(ast.parse(path.read_text()))
                   if isinstance(node, ast.Attribute) and node.attr in ("client", "_client")}
        assert not reaches, f"{module} reaches for the tracker's MLflow client"


def test_no_test_module_imports_another():
    """Tests share fixtures (tests/plugins) and helpers (tests/support), never one another's modules."""
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        names = imported_names(path, f"tests.{path.stem}")
        assert not {n for n in names if n.startswith("tests.test_")}, path.name


# ---------------------------------------------------------------------------------------------
# docs/ARCHITECTURE.md, read back: its layers and its module tables


def doc_section(title: str) -> list[str]:
    """The lines of the doc's `## title` section."""
    lines = DOC.read_text().splitlines()
    start = lines.index(f"## {title}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def layer_entries(lines: list[str]) -> dict[str, int]:
    """The numbered list of the Layers section: entry -> its layer (1 = top). An entry is the
    backquoted names before the line's dash: an orchestrator module or package by its name (`launch`,
    `report`), or a whole top-level package (`trainer`)."""
    entries: dict[str, int] = {}
    numbers = []
    for line in lines:
        if match := re.match(r"(\d+)\. (.*)", line):
            number, text = int(match[1]), match[2].split(" — ")[0]
            numbers.append(number)
            for name in re.findall(r"`([^`]+)`", text):
                assert name not in entries, f"{name} is in two layers of {DOC.name}"
                entries[name] = number
    assert numbers == list(range(1, len(numbers) + 1)), f"the layers of {DOC.name} are not numbered 1..N: {numbers}"
    return entries


def entry_module(entry: str, ours: dict[str, Path]) -> str:
    """The module or package a layer entry names: `launch` -> orchestrator.launch, `trainer` -> trainer."""
    for name in (f"orchestrator.{entry}", entry):
        if name in ours:
            return name
    raise AssertionError(f"{DOC.name} lists `{entry}` as a layer, but there is no orchestrator/{entry}.py, "
                         f"orchestrator/{entry}/ or {entry}/ package")


def unit_of(module: str, units: dict[str, int]) -> str | None:
    """The layer entry a module belongs to: itself, or the package (entry) it is inside."""
    return next((u for u in sorted(units, key=len, reverse=True) if module == u or module.startswith(u + ".")), None)


def layer_violations(graph: dict[str, set[str]], units: dict[str, int]) -> list[str]:
    """Every import that does not point to a lower layer (a higher number). Modules of one entry (a
    package such as `trainer`) import one another freely; the cycle check covers them."""
    bad = []
    for module, imported in sorted(graph.items()):
        here = unit_of(module, units)
        for name in sorted(imported):
            there = unit_of(name, units)
            if here is None or there is None or here == there:
                continue
            if units[there] <= units[here]:
                bad.append(f"{module} (layer {units[here]}) imports {name} (layer {units[there]})")
    return bad


def doc_layers() -> dict[str, int]:
    """The doc's layers by module or package name (orchestrator.launch -> 2)."""
    ours = modules()
    return {entry_module(entry, ours): layer for entry, layer in layer_entries(doc_section("Layers")).items()}


def test_the_layer_check_finds_an_upward_and_a_sideways_import():
    units = {"a": 1, "b": 2, "c": 2, "p": 3}
    assert layer_violations({"a": {"b"}, "b": {"p.x"}, "p.x": {"p.y"}, "p.y": set()}, units) == []
    assert layer_violations({"b": {"a"}}, units) == ["b (layer 2) imports a (layer 1)"]
    assert layer_violations({"b": {"c"}}, units) == ["b (layer 2) imports c (layer 2)"]
    assert layer_violations({"p.x": {"b"}}, units) == ["p.x (layer 3) imports b (layer 2)"]


def test_the_doc_layers_parse_as_written():
    lines = ["1. `cli` — commands", "2. `launch`, `status` — runs: `not`, `these`", "text `ignored`", "3. `trainer`"]
    assert layer_entries(lines) == {"cli": 1, "launch": 2, "status": 2, "trainer": 3}


def test_imports_point_down_the_layers_of_the_doc():
    layers = doc_layers()
    assert {"orchestrator.cli", "orchestrator.launch", "trainer"} <= layers.keys()  # the doc was read
    graph = import_graph()
    assert "orchestrator.launch" in graph["orchestrator.cli"]  # `from orchestrator import launch` counts
    bad = layer_violations(graph, layers)
    assert not bad, f"imports against the layers of {DOC.name} (move the module or change the doc):\n" + "\n".join(bad)


def test_every_module_has_a_layer_in_the_doc():
    """A new module must be placed: otherwise nothing would check its imports."""
    layers = doc_layers()
    unplaced = [m for m in modules() if m not in PACKAGES and unit_of(m, layers) is None]
    assert not unplaced, f"modules in no layer of {DOC.name}: {unplaced}"


def test_the_top_level_packages_import_nothing():
    """`import orchestrator` (which every `from orchestrator import x` runs) costs nothing, so those
    imports need no layer of their own."""
    for package in PACKAGES:
        tree = ast.parse((ROOT / package / "__init__.py").read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))], package


def table_files(lines: list[str]) -> set[str]:
    """The files a section's tables name in their first column: `orchestrator/report.py`, `plots.py`
    (a bare name lives in the folder of the name before it in the cell), and a package's folder
    (`orchestrator/report/`), which stands for its `__init__.py`."""
    named = set()
    for line in lines:
        if not line.startswith("| `"):
            continue
        folder = ""
        for name in re.findall(r"`([^`]+)`", line.split("|")[1]):
            if "/" in name:
                folder, _, leaf = name.rpartition("/")
                folder += "/"
                named.add(name if leaf else folder + "__init__.py")
            else:
                named.add(folder + name)
    return named


def test_the_table_reader_resolves_bare_names_and_packages():
    lines = ["| module | owns |", "|---|---|", "| `orchestrator/report.py`, `plots.py` | x |",
             "| `orchestrator/report/`, `fetch.py`, `rows.py` | y |", "| `trainer/config.py` | `z.py` |"]
    assert table_files(lines) == {"orchestrator/report.py", "orchestrator/plots.py", "orchestrator/report/__init__.py",
                                  "orchestrator/report/fetch.py", "orchestrator/report/rows.py", "trainer/config.py"}


def only_a_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return all(isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) for node in body)


def test_the_module_tables_name_every_module_and_nothing_that_is_gone():
    named = table_files(doc_section("Modules"))
    files = {str(path.relative_to(ROOT)) for path in modules((*PACKAGES, "benchmarks")).values()}
    # A package's __init__.py that holds only its docstring needs no row of its own.
    unnamed = sorted(f for f in files - named if not (f.endswith("__init__.py") and only_a_docstring(ROOT / f)))
    assert not unnamed, f"modules without a row in the module tables of {DOC.name}: {unnamed}"
    gone = sorted(named - files)
    assert not gone, f"rows of {DOC.name} name files that do not exist: {gone}"


def test_the_orchestrator_spells_no_metric_name():
    """A trial's metric names are declared once, in trainer/metric_names.py (which imports nothing);
    the orchestrator's tables, console and report use its constants."""
    from trainer.metric_names import PSNR_CURVE, STEP, TRIAL_METRICS

    names = {*TRIAL_METRICS, STEP, PSNR_CURVE}
    for module, path in modules().items():
        if module.startswith("orchestrator"):
            assert not string_literals(path) & names, f"{module} spells {string_literals(path) & names}"
    assert not imported_names(ROOT / "trainer" / "metric_names.py", "trainer.metric_names")


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """Every module `start` imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        for name in graph[todo.pop()] - seen:
            seen.add(name)
            todo.append(name)
    return seen


def test_the_state_machine_and_the_console_do_not_load_the_tracking_package():
    """They read the run states (orchestrator.run_states) only: loading the tracking package would set
    MLflow's environment and put MLflow one import away."""
    graph = import_graph()
    assert reachable({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "a") == {"a", "b", "c"}
    for module in ("orchestrator.trial_state", "orchestrator.console", "orchestrator.run_states"):
        assert not {m for m in reachable(graph, module) if in_tracking(m)}, module

