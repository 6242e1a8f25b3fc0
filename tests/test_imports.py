"""Every import of the project's own modules names a module and a name that exist, in every file, benches
and function-level imports included (a moved module once left a bench unable to start, unnoticed).

Read from the source with `ast`, nothing is imported: checking a function-level import by running it would
need each code path to run."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"engine", "stages", "schemas", "pipelines", "chatrex", "release", "scaffold", "upn"}
SCANNED = [*sorted(PACKAGES), "bench", "tests"]


def module_file(module: str) -> Path | None:
    base = ROOT.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def top_level_names(path: Path) -> set[str]:
    """Names a module defines at import time: functions, classes, assignments, imports (also under a
    top-level if / try)."""
    names: set[str] = set()

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, ast.If):
                visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                visit(node.orelse)
                visit(node.finalbody)
                for handler in node.handlers:
                    visit(handler.body)

    visit(ast.parse(path.read_text()).body)
    return names


def broken_imports(source: str, name: str) -> list[str]:
    """`name:problem` for each import in `source` of a project module or name that does not exist."""
    problems = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
            problems += [f"import {m}" for m in modules if m.split(".")[0] in PACKAGES and not module_file(m)]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] not in PACKAGES:
                continue
            target = module_file(node.module)
            if target is None:
                problems.append(f"from {node.module} import ...: no such module")
                continue
            defined = top_level_names(target)
            for alias in node.names:
                if alias.name not in defined and not module_file(f"{node.module}.{alias.name}"):
                    problems.append(f"from {node.module} import {alias.name}: not defined there")
    return [f"{name}:{problem}" for problem in problems]


def test_every_project_import_resolves():
    files = [f for folder in SCANNED for f in sorted((ROOT / folder).rglob("*.py"))]
    assert len(files) > 100
    problems = [p for f in files for p in broken_imports(f.read_text(), str(f.relative_to(ROOT)))]
    assert problems == []


def test_a_moved_module_or_a_missing_name_is_caught():
    source = (
        "def main():\n"
        "    from pipelines.make_fixture import generate_fixture\n"
        "    from engine.training import no_such_function\n"
        "    from engine.training import shard_paths\n"
        "    import upn.nowhere\n"
    )
    assert broken_imports(source, "probe.py") == [
        "probe.py:from pipelines.make_fixture import ...: no such module",
        "probe.py:from engine.training import no_such_function: not defined there",
        "probe.py:import upn.nowhere",
    ]


def imported_modules(source: str, package: str) -> set[str]:
    """The project modules a file imports anywhere (top level, in functions, under TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the importing package
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {m for m in found if m.split(".")[0] in PACKAGES and module_file(m)}


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan), each sorted; a self-import counts too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1 or node in graph.get(node, ()):
                cycles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def module_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (a package's `__init__.py` is the package itself)."""
    graph: dict[str, set[str]] = {}
    for folder in sorted(PACKAGES):
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            is_init = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_init else parts)
            package = name if is_init else name.rpartition(".")[0]
            graph[name] = imported_modules(path.read_text(), package) - {name}
    return graph


def test_no_import_cycles():
    """No two project modules import each other, directly or around a loop, at any level: a function-level
    import still ties the modules (and turns into an import-time failure as soon as someone hoists it)."""
    graph = module_graph()
    assert len(graph) > 80
    assert import_cycles(graph) == []


def test_an_import_cycle_is_caught():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert import_cycles(graph) == [["a", "b", "c"], ["e"]]
