"""Layering of `src/spo`: the core never imports the embedded world (a plug-in), and no module
imports itself through others. Both are read from the source (AST), function-level imports included,
so a lazy import cannot hide a dependency."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
WORLD = "spo.world"
MAY_IMPORT_THE_WORLD = {"spo.cli", "spo.demo"}  # the application shell, not the library


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(src: Path) -> dict[str, Path]:
    return {module_name(p, src): p for p in sorted(src.rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Every dotted name imported anywhere in the file: `import a.b` -> a.b; `from a import b` -> a.b (and a)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def import_graph(src: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same tree it imports (a `from pkg import name` that is not a module
    counts as importing `pkg`)."""
    known = modules(src)
    graph = {}
    for name, path in known.items():
        targets = {n for n in imported_names(path, name) if n in known}
        graph[name] = targets - {name}
    return graph


def world_importers(src: Path) -> list[str]:
    """Modules outside the world package (and the allowed shell) that import it."""
    return sorted(name for name, path in modules(src).items()
                  if name != WORLD and not name.startswith(WORLD + ".") and name not in MAY_IMPORT_THE_WORLD
                  and any(n == WORLD or n.startswith(WORLD + ".") for n in imported_names(path, name)))


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, colouring the nodes)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


# ------------------------------------------------------------------ the rules, on the real tree


def test_the_core_does_not_import_the_world():
    offenders = world_importers(SRC)
    assert not offenders, (f"{', '.join(offenders)} import {WORLD}; the world is a plug-in: add what the core needs "
                           "to spo.plugins and have spo/world/plugin.py register it")


def test_no_import_cycles():
    cycle = find_cycle(import_graph(SRC))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# ------------------------------------------------------------------ the checkers catch what they should


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_every_way_of_importing_the_world_is_caught(tmp_path):
    src = _tree(tmp_path, {
        "spo/__init__.py": "", "spo/world/__init__.py": "", "spo/world/scenes.py": "",
        "spo/world/plugin.py": "from spo.world import scenes\n",  # the world importing itself is fine
        "spo/a.py": "import spo.world.scenes\n",
        "spo/b.py": "def f():\n    from spo.world.scenes import x\n",  # function-level
        "spo/c.py": "from spo import world\n",
        "spo/d.py": "from . import world\n",  # relative
        "spo/sub/__init__.py": "", "spo/sub/e.py": "from ..world import scenes\n",
        "spo/cli.py": "from spo.world import scenes\n",  # allowed
        "spo/clean.py": "from spo import plugins\nimport spo.worldly\n",
    })
    assert world_importers(src) == ["spo.a", "spo.b", "spo.c", "spo.d", "spo.sub.e"]


def test_cycles_through_function_level_imports_are_found(tmp_path):
    src = _tree(tmp_path, {
        "spo/__init__.py": "", "spo/w/__init__.py": "",
        "spo/w/build.py": "def f():\n    from spo.w import report\n",
        "spo/w/report.py": "from spo.w.data import x\n",
        "spo/w/data.py": "def g():\n    from spo.w.build import y\n",
        "spo/w/ok.py": "from spo.w import data\n",
    })
    cycle = find_cycle(import_graph(src))
    assert cycle is not None and cycle[0] == cycle[-1] and set(cycle) == {"spo.w.build", "spo.w.report", "spo.w.data"}
    (src / "spo/w/data.py").write_text("from spo.w import ok\n")
    (src / "spo/w/ok.py").write_text("import json\n")
    assert find_cycle(import_graph(src)) is None
