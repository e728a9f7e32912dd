"""The package's import graph: no circles, no upward arrows (issue 26).

Every ``import`` and ``from … import`` in ``shiftfs/`` counts, wherever it is
written: at the top, inside a function (a lazy import is still an arrow) or
under ``TYPE_CHECKING``. The layers, lowest first; a module may import its
own layer and the layers listed for it, nothing else:

* ``errors`` (and the package's ``__init__``, the version): the floor,
  exception classes every layer raises; they import nothing of shiftfs;
* ``sys``: the one libc layer (and the one tree walk); only itself and the floor;
* ``ownership``: every ownership rule; ``sys`` and the floor;
* ``offline`` (export, import, absorb…) and ``fs`` (the mount engine): each
  on ``ownership`` and below, never on each other;
* ``container`` (run/exec): ``fs`` and below;
* the command line (``cli``, ``__main__``, the ``devtable`` shim): anything.

Within a layer any arrow is fine as long as no circle closes.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parent.parent / "shiftfs"

FLOOR = {"shiftfs", "errors"}
#: layer → the other layers it may import
ALLOWED = {
    "shiftfs": set(),
    "errors": set(),
    "sys": {"errors"},
    "ownership": {"sys", "errors"},
    "offline": {"ownership", "sys", "errors", "shiftfs"},
    "fs": {"ownership", "sys", "errors", "shiftfs"},
    "container": {"fs", "ownership", "sys", "errors", "shiftfs"},
}
TOP = {"cli", "__main__", "devtable"}

#: Known arrows being removed on another branch: listed so the rest is enforced now.
#: Each must disappear from this list once it is gone from the code (the test says so).
PENDING_UPWARD: set[tuple[str, str]] = set()
PENDING_CIRCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted(PKG.rglob("*.py")):
        parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = path
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for mod, path in mods.items():
        package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
        out: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package[: len(package) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "shiftfs":
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    out.add(sub if sub in mods else target)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.split(".")[0] == "shiftfs")
        unknown = out - set(mods)
        assert not unknown, f"{mod} imports {sorted(unknown)}, which are not modules of the package"
        graph[mod] = out - {mod}
    return graph


def _layer(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "shiftfs"


def _circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[set[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = set()
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.add(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    found.append(comp)
    return found


def _upward(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    bad = set()
    for mod, targets in graph.items():
        layer = _layer(mod)
        if layer in TOP:
            continue
        assert layer in ALLOWED, f"{mod}: layer {layer!r} is not in the test's layering; add it to ALLOWED"
        for t in targets:
            tl = _layer(t)
            if tl != layer and tl not in ALLOWED[layer]:
                bad.add((mod, t))
    return bad


def test_the_checker_sees_circles_and_upward_arrows():
    graph = {"shiftfs.sys.a": {"shiftfs.ownership.b"}, "shiftfs.ownership.b": {"shiftfs.sys.a"}, "shiftfs.sys.c": set()}
    assert _circles(graph) == [{"shiftfs.sys.a", "shiftfs.ownership.b"}]
    assert _upward(graph) == {("shiftfs.sys.a", "shiftfs.ownership.b")}
    real = _graph()
    assert "shiftfs.sys.walk" in real["shiftfs.offline.walk"]  # relative imports resolve
    assert "shiftfs.fs.idmapped" in real["shiftfs.fs.daemon"]  # lazy imports count


def test_no_upward_arrows():
    bad = _upward(_graph())
    new = sorted(bad - PENDING_UPWARD)
    arrows = ", ".join(f"{a} -> {b}" for a, b in new)
    assert not new, f"upward imports (see this module's note for the layers): {arrows}"
    fixed = sorted(PENDING_UPWARD - bad)
    assert not fixed, f"gone from the code, now delete from PENDING_UPWARD: {fixed}"


def test_no_import_circles():
    circles = _circles(_graph())
    new = [sorted(c) for c in circles if c not in PENDING_CIRCLES]
    assert not new, f"import circles: {new}"
    fixed = [sorted(c) for c in PENDING_CIRCLES if c not in circles]
    assert not fixed, f"gone from the code, now delete from PENDING_CIRCLES: {fixed}"
