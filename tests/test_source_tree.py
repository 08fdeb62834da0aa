"""The shipped source tree: every module imports; no import circle joins any of them, counting imports inside
functions (a circle works only while the order of first imports happens to allow it, and breaks when someone imports
differently); and no docstring or comment cites a repository file that does not exist."""

import ast
import importlib
import pkgutil
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def shipped_modules() -> dict[str, Path]:
    """Module name -> source file, for every package pyproject.toml ships and the modules in each."""
    found = {}
    for name in PACKAGES:
        package = importlib.import_module(name)
        found[name] = Path(package.__file__)
        for info in pkgutil.iter_modules(package.__path__, name + "."):
            if not info.ispkg:
                found[info.name] = Path(info.module_finder.path) / (info.name.rsplit(".", 1)[1] + ".py")
    return found


def imported(tree: ast.Module, module: str, is_package: bool, known) -> set[str]:
    """The known modules `tree` imports anywhere (module level, functions, classes)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                parts = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `from a.b import c`: the module a.b.c, else a.b's package
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = shipped_modules()
    return {name: imported(ast.parse(path.read_text()), name, path.name == "__init__.py", modules)
            for name, path in modules.items()}  # fmt: skip


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    done, path = set(), []

    def visit(node):
        if node in path:
            return path[path.index(node) :] + [node]
        if node in done:
            return None
        path.append(node)
        for target in sorted(graph[node]):
            cycle = visit(target)
            if cycle:
                return cycle
        path.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        cycle = visit(node)
        if cycle:
            return cycle
    return None


def test_every_module_imports():
    modules = shipped_modules()
    assert "rtpjax.models.llama" in modules and "rtpjax.serve.app" in modules and "rtpjax.loading.loader" in modules
    for name in modules:
        importlib.import_module(name)


def test_no_import_circle_among_rtpjax_modules():
    graph = import_graph()
    assert "rtpjax.loading.orbax_checkpoint" in graph["rtpjax.loading.model_source"]
    assert "rtpjax.loading.model_source" in graph["rtpjax.engine.core"]  # imported inside a function
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_circles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse("import rtpjax.x.y\ndef f():\n    from rtpjax.x import z\n    from . import w\n")
    known = {"rtpjax", "rtpjax.x", "rtpjax.x.y", "rtpjax.x.w"}
    assert imported(tree, "rtpjax.x.v", False, known) == {"rtpjax.x.y", "rtpjax.x", "rtpjax.x.w"}


def test_cited_repository_files_exist():
    cited = re.compile(r"\b(?:rtpjax|models|serve|benchmarks|tests)/[\w./-]*\w")
    missing = [(path.name, ref) for path in shipped_modules().values() for ref in cited.findall(path.read_text())
               if not (ROOT / ref).exists()]  # fmt: skip
    assert not missing, f"cited but not in the repository: {missing}"
