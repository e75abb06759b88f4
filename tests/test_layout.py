"""The package's import structure: no import cycles between its modules, and every module imports.

The graph is read from the source with `ast` (every `import` / `from ... import`, module-level and
inside functions alike: a lazy import that closes a cycle is still a cycle a reader has to untangle).
`neti_fast/__init__.py` (the documented API, which imports from everywhere) and `__main__.py` are
left out as sources; nothing may import `neti_fast.cli`.

Layers (docs/architecture.md, "Code map"): a module imports only from its own subpackage or from a lower layer.
`errors`, `utils`, `images` (grids) and the Triton `kernels` are under everything; `sd` (the model) and `concepts` import nothing above
them; `engine` (with `export`, the U-Net runtimes it drives) imports those; `options` (the flags
shared by commands), then `training` and `jobs`, then `evaluation` and `serve`, then `api`, then `demo` and
`bench`, and `cli` on top.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# installed package name -> source folder (setup.py's package_dir)
FOLDERS = {"neti_fast": "neti_fast", "neti_fast.kernels": "kernels", "neti_fast.export": "export",
           "neti_fast.bench": "bench"}


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in FOLDERS.items():
        for f in (ROOT / folder).rglob("*.py"):
            parts = [p for p in f.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = f
    return mods


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (a `from pkg import name` of a submodule counts as it)."""
    graph = {}
    for name, f in mods.items():
        package = name if f.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                deps.update(subs or ([target] if target in mods else []))
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in mods)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n):
        state[n] = 1
        path.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                return path[path.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        path.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def _graph():
    mods = _modules()
    g = import_graph(mods)
    for top in ("neti_fast", "neti_fast.__main__"):  # the API facade and the entry point import everything
        g.pop(top, None)
    for deps in g.values():
        deps.discard("neti_fast")
    return g


LAYERS = [("neti_fast.errors",), ("neti_fast.utils",), ("neti_fast.images",), ("neti_fast.kernels",),
          ("neti_fast.sd",), ("neti_fast.concepts",), ("neti_fast.export",), ("neti_fast.engine",),
          ("neti_fast.options",), ("neti_fast.training", "neti_fast.jobs"),
          ("neti_fast.evaluation", "neti_fast.serve"), ("neti_fast.api",), ("neti_fast.demo", "neti_fast.bench"),
          ("neti_fast.cli",)]


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, the unit it belongs to: a subpackage or a top-level module) of a package module."""
    for i, units in enumerate(LAYERS):
        for u in units:
            if module == u or module.startswith(u + "."):
                return i, u
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layout.py")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a unit in the same or a higher layer, other than a module's own unit."""
    bad = []
    for mod, deps in sorted(graph.items()):
        (li, lu) = layer_of(mod)
        for d in sorted(deps):
            (di, du) = layer_of(d)
            if du != lu and di >= li:
                bad.append(f"{mod} -> {d}")
    return bad


def test_layers():
    bad = upward_imports(_graph())
    assert bad == [], "imports against the layer order (LAYERS):\n  " + "\n  ".join(bad)


def test_layer_check_finds_an_upward_import():
    assert upward_imports({"neti_fast.sd.models": {"neti_fast.engine.engine"}}) == \
        ["neti_fast.sd.models -> neti_fast.engine.engine"]
    assert upward_imports({"neti_fast.jobs.runner": {"neti_fast.training.data"}}) == \
        ["neti_fast.jobs.runner -> neti_fast.training.data"]   # same layer, other unit
    assert upward_imports({"neti_fast.engine.engine": {"neti_fast.sd.models", "neti_fast.engine.kv_arena"}}) == []


def test_no_import_cycles():
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_nothing_imports_the_cli():
    users = sorted(n for n, deps in _graph().items() if "neti_fast.cli" in deps and n != "neti_fast.cli")
    assert users == [], f"{users} import neti_fast.cli (it sits on top: move what they need below it)"


def test_cycle_finder_finds_a_cycle():
    # the check itself can fail: a three-module ring and a self-contained chain
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_every_module_imports():
    """Every module of the package imports, in one fresh interpreter (optional extras such as
    tensorrt or fastapi are imported lazily inside functions, so this holds on a CPU install)."""
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    r = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]


def test_checkout_folders_do_not_shadow_installed_packages(tmp_path):
    """Run from the checkout's root (as `python -m pytest` and `python -m neti_fast` are), the top-level
    kernels/ folder must not hide an installed `kernels` package (Hugging Face's, which transformers
    >= 5.25 requires and imports): once neti_fast is imported, `import kernels` is the installed one."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'installed'\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"))
    code = "import neti_fast, kernels, neti_fast.kernels.cross_attention as ka; print(kernels.WHO, ka.__name__)"
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.split() == ["installed", "neti_fast.kernels.cross_attention"], r.stderr
