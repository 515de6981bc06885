"""The layout README's Architecture section promises: apps apart from the library, no import
cycle, no kernel file reaching into another's private names, and every module listed where a
reader looks for it (README's Layout, the package's docstring)."""

import ast
import subprocess
import sys
from pathlib import Path

import triton_convlstm

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "triton_convlstm"
KERNELS = ROOT / "kernels"


def _module_name(path: Path) -> str:
    """Dotted name of a source file as installed (kernels/ is triton_convlstm.kernels)."""
    if path.is_relative_to(KERNELS):
        parts = ["triton_convlstm", "kernels", *path.relative_to(KERNELS).with_suffix("").parts]
    else:
        parts = ["triton_convlstm", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources() -> dict[str, Path]:
    files = [*PACKAGE.rglob("*.py"), *KERNELS.rglob("*.py")]
    return {_module_name(p): p for p in files}


def _imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, at any depth (lazy
    imports inside functions count: they close a cycle just as well when they run)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            found.append((target, [a.name for a in node.names]))
    return found


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports. ``from . import graphs`` is an edge to the
    submodule graphs, not to the package (whose __init__ is already running)."""
    sources = _sources()
    graph = {}
    for name, path in sources.items():
        edges = set()
        for target, names in _imports(name, path):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in sources]
            edges |= set(subs) if subs else ({target} & sources.keys())
        graph[name] = edges
    return graph


def test_import_triton_convlstm_imports_no_app():
    code = ("import sys, triton_convlstm; "
            "print([m for m in sys.modules if m.startswith('triton_convlstm.apps')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"


def test_the_library_never_imports_the_apps():
    # __main__ is the command line: it dispatches to the apps (lazily).
    for name, targets in _graph().items():
        if not name.startswith(("triton_convlstm.apps", "triton_convlstm.__main__")):
            assert not any(t.startswith("triton_convlstm.apps") for t in targets), name


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_import_graph_is_read():
    graph = _graph()
    assert len(graph) >= 20
    assert "triton_convlstm.graphs" in graph["triton_convlstm.modules"]  # from . import graphs
    assert "triton_convlstm.kernels._common" in graph["triton_convlstm.kernels.gates"]
    assert "triton_convlstm.kernels.gates" in graph["triton_convlstm.gate_launchers"]  # lazy


def test_no_kernel_file_imports_another_ones_private_names():
    sources = _sources()
    for name, path in sources.items():
        if not name.startswith("triton_convlstm.kernels"):
            continue
        for target, names in _imports(name, path):
            if target.startswith("triton_convlstm.kernels") and target != name:
                private = [n for n in names if n.startswith("_")]
                assert not private, f"{name} imports {private} from {target}"


def test_every_module_is_listed_in_the_readme_and_the_package_docstring():
    layout = (ROOT / "README.md").read_text().split("## Layout")[1].split("## ")[0]
    doc = triton_convlstm.__doc__
    for name, path in _sources().items():
        rel = path.relative_to(ROOT).as_posix()
        folder = path.parent.relative_to(ROOT).as_posix() + "/"
        assert rel in layout or (path.name in layout and folder in layout), rel
        top = name.split(".")[1] if name.count(".") else None
        if top and path.parent == PACKAGE:
            assert f"``{top}``" in doc, top


def test_the_package_exports_the_layers_the_cells_and_gate_update():
    from triton_convlstm import step_op

    assert triton_convlstm.__all__ == [
        "ConvLSTM", "ConvLSTM1d", "ConvLSTM2d", "ConvLSTM3d", "ConvLSTMCell", "ConvLSTMCell1d",
        "ConvLSTMCell2d", "ConvLSTMCell3d", "gate_update"]
    assert triton_convlstm.gate_update is step_op.gate_update
    assert isinstance(triton_convlstm.__version__, str)
