"""House rules, read from the source: the import graph (every import, at module level or inside a function) has
no circle between modules and no import from a lower layer to a higher one, and no function is over 60 lines.
Breaking one fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "idlm"
# lowest first; a package may import its own modules and any package of a lower rank, nothing else
RANK = {"config": 0, "text": 0, "metrics": 0, "model": 1, "decode": 2, "engine": 3, "data": 4, "train": 5,
        "eval": 6, "interop": 6, "server": 6, "cli": 7}


def _modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = p
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The module an import name lands in (``idlm.model.loading.load_model`` -> ``idlm.model.loading``)."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name if name in MODULES else None


def _imports(mod: str) -> set[str]:
    path = MODULES[mod]
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            names = [f"{base}.{a.name}" for a in node.names]
        for n in names:
            t = _target(n) if n.startswith("idlm") else None
            if t is not None and t != mod:
                out.add(t)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _package(mod: str) -> str:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 else "idlm"


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read() -> None:
    assert len(MODULES) > 60
    assert "idlm.model.decoder" in GRAPH["idlm.engine.engine"]  # a known edge is found
    assert "idlm.model" in GRAPH["idlm.cli.common"] and "idlm.model.loading" in GRAPH["idlm.model"]  # packages too


def test_every_package_has_a_layer() -> None:
    assert {_package(m) for m in MODULES} - {"idlm"} == set(RANK)


def test_no_import_circle() -> None:
    assert _cycles() == []


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_imports_only_go_down(mod: str) -> None:
    src = _package(mod)
    up = [t for t in GRAPH[mod] if _package(t) not in (src, "idlm")
          and RANK[_package(t)] >= RANK.get(src, -1)]
    assert up == [], f"{mod} imports from the same or a higher layer: {up}"


def test_the_checks_catch_a_circle_and_an_upward_import() -> None:
    GRAPH["idlm.model.rope"].add("idlm.engine.engine")  # model -> engine: upward, and engine -> ... -> model
    try:
        assert _cycles() != []
        with pytest.raises(AssertionError):
            test_imports_only_go_down("idlm.model.rope")
    finally:
        GRAPH["idlm.model.rope"].discard("idlm.engine.engine")


MAX_FUNCTION_LINES = 60


def test_no_function_is_over_60_lines() -> None:
    long = []
    for mod, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{mod}.{node.name}: {n} lines")
    assert long == []
