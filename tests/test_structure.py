"""The package's structure: every module imports, the imports between its modules form no cycle (lazy
imports inside functions included), backend names are branched on only where they are mapped to an
implementation, and every public function has type hints.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "cupy_cosattn"
ROOT_NAME = "cupy_cosattn"
BACKEND_NAMES = {"auto", "cuda", "emulator", "reference", "torch"}
# Where a backend name is mapped to what runs it: the package's backends and the torch op's keyword
# (which adds "torch", its own CPU implementation).
NAME_MAPPING_MODULES = {"cupy_cosattn.backends", "cupy_cosattn.torch.backends"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = (ROOT_NAME,) + path.relative_to(PKG).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package modules `name` imports anywhere in its source (a name imported from a package that
    is itself a module counts as that module)."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:  # "cupy_cosattn.launch.x.y" -> the longest module prefix
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def test_every_module_imports():
    for name in MODULES:
        if name.endswith(".__main__"):  # runs the program when imported
            continue
        if name.startswith(("cupy_cosattn.torch", "cupy_cosattn.bench")):
            pytest.importorskip("torch")
        importlib.import_module(name)


def test_imports_form_no_cycle():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    assert graph["cupy_cosattn.launch.backward"] >= {"cupy_cosattn.launch.devices", "cupy_cosattn.launch.dispatch"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = path[path.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def _names_a_backend(node: ast.AST) -> bool:
    """A variable or attribute that holds a backend name (`backend`, `name`, `self.name`, ...)."""
    ident = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else ""
    return "backend" in ident.lower() or ident == "name"


def _backend_literals(node: ast.AST) -> set[str]:
    elts = node.elts if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else [node]
    return {e.value for e in elts if isinstance(e, ast.Constant) and e.value in BACKEND_NAMES}


def backend_name_branches(path: Path) -> list[str]:
    """Comparisons of a backend-name variable with a backend name literal (==, !=, in, not in)."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Compare):
            sides = [node.left] + list(node.comparators)
            if any(_names_a_backend(s) for s in sides) and any(_backend_literals(s) for s in sides):
                hits.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    return hits


def test_backend_names_are_branched_on_in_one_place():
    hits = [h for name, path in MODULES.items() if name not in NAME_MAPPING_MODULES
            for h in backend_name_branches(path)]
    assert hits == []


def test_the_backend_name_check_finds_branches(tmp_path):
    """The check above is not vacuous: it finds the branches it forbids."""
    src = tmp_path / "x.py"
    src.write_text('if self.name == "cuda":\n    pass\nif backend in ("emulator", "reference"):\n    pass\n'
                   'if dev.type == "cuda":\n    pass\n')
    assert len(backend_name_branches(src)) == 2
    assert backend_name_branches(MODULES["cupy_cosattn.backends"])


def _unhinted(tree: ast.AST) -> list[str]:
    """Public functions and methods (of public classes) with an argument or the return unannotated."""
    out = []

    def walk(node: ast.AST, owner: str) -> None:
        for ch in ast.iter_child_nodes(node):
            if isinstance(ch, ast.ClassDef) and not ch.name.startswith("_"):
                walk(ch, f"{owner}{ch.name}.")
            elif isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef)):
                dunder = ch.name.startswith("__") and ch.name.endswith("__")
                if ch.name.startswith("_") and not dunder:
                    continue
                args = ch.args.posonlyargs + ch.args.args + ch.args.kwonlyargs
                missing = [a.arg for a in args if a.annotation is None and a.arg not in ("self", "cls")]
                missing += ["return"] if ch.returns is None else []
                if missing:
                    out.append(f"{owner}{ch.name}: {missing}")

    walk(tree, "")
    return out


def test_public_functions_have_type_hints():
    bad = {name: _unhinted(ast.parse(path.read_text())) for name, path in MODULES.items()}
    assert {n: b for n, b in bad.items() if b} == {}
    assert _unhinted(ast.parse("def f(x, y: int) -> int: ...\nclass C:\n    def g(self): ...\n")) == \
        ["f: ['x']", "C.g: ['return']"]
