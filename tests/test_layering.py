"""Dependencies point one way: no import cycles between taskvec's parts, no hidden imports of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import taskvec

SOURCE = Path(taskvec.__file__).resolve().parent


def _part(module: str) -> str:
    """taskvec.experiments.execution.runner -> experiments; taskvec.caching -> caching."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "taskvec"


# Imports a part makes inside one function only, upward on purpose: the named-model table's
# "default-vlm" entry builds the model through the VLM's package when that name is loaded.
DEFERRED = {("models", "vlm")}


def _outside_functions(node: ast.AST) -> list[ast.AST]:
    """The node and its descendants, without the bodies of functions (what runs at import)."""
    found = [node]
    for child in ast.iter_child_nodes(node):
        if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found += _outside_functions(child)
    return found


def _imports(module_level: bool = False) -> dict[str, set[str]]:
    """Every part's imports of other parts, function-level imports included unless `module_level`."""
    graph: dict[str, set[str]] = {}
    for path in SOURCE.rglob("*.py"):
        module = ".".join(("taskvec", *path.relative_to(SOURCE).with_suffix("").parts))
        part = _part(module.removesuffix(".__init__"))
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in _outside_functions(tree) if module_level else ast.walk(tree):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                if name.startswith("taskvec") and _part(name) != part:
                    graph.setdefault(part, set()).add(_part(name))
    return graph


def test_parts_of_the_package_import_each_other_without_cycles() -> None:
    graph = {
        part: {target for target in targets if (part, target) not in DEFERRED}
        for part, targets in _imports().items()
    }

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for target in graph.get(start, set()):
            if target == goal or (target not in seen and reaches(target, goal, seen | {target})):
                return True
        return False

    cycles = sorted(part for part in graph if reaches(part, part, {part}))
    assert cycles == [], f"import cycles through {cycles}"
    assert "vlm" not in _imports(module_level=True).get("models", set()), (
        "models must not import the default VLM's package when it is imported"
    )
    assert not graph.get("engine", set()) - {"models"}, "the engine knows nothing of tasks"
    assert "models" not in graph.get("tasks", set()), "tasks know nothing of models"


def test_no_module_imports_the_project_by_a_string() -> None:
    offenders = [
        str(path.relative_to(SOURCE))
        for path in SOURCE.rglob("*.py")
        if "import_module(" in path.read_text(encoding="utf-8")
        or "__import__(" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []


def _experiments_imports() -> dict[str, set[str]]:
    """Imports between experiments' own parts: protocol, execution, results, config, demo."""
    root = SOURCE / "experiments"
    graph: dict[str, set[str]] = {}
    for path in root.rglob("*.py"):
        part = path.relative_to(root).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("taskvec.experiments.")
            ):
                target = node.module.split(".")[2]
                if target != part:
                    graph.setdefault(part, set()).add(target)
    return graph


def test_the_run_core_is_split_protocol_then_execution_with_results_a_leaf() -> None:
    graph = _experiments_imports()
    assert graph.get("results", set()) <= {"config"}, (
        "the results the report reads import no protocol or execution"
    )
    assert "execution" not in graph.get("protocol", set()), "the protocol knows nothing of how steps run"
    assert "config" in graph.get("execution", set())


def test_argparse_stays_in_the_command_line() -> None:
    offenders = [
        str(path.relative_to(SOURCE))
        for part in ("experiments", "analysis", "report")
        for path in (SOURCE / part).rglob("*.py")
        if "argparse" in path.read_text(encoding="utf-8")
    ]
    assert offenders == []
