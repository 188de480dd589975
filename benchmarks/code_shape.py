"""The code's shape, measured as the design review measures it: functions longer than a limit
(def to last line, outside `cli/`), files over 500 lines, and import cycles between modules
(every import statement counted: top-level, lazy inside functions, and type-only). Run from
the repository root:

    python benchmarks/code_shape.py [--limit 80]

Exits 1 when a function is over the limit, more than 3 files are over 500 lines, or a cycle
exists.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "probekit"


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = list(p.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _targets(mods: dict[str, Path], cur: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    names = []
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = cur.split(".")
            pkg = pkg if mods[cur].name == "__init__.py" else pkg[:-1]
            pkg = pkg[: len(pkg) - (node.level - 1)]
            base = ".".join([*pkg, base] if base else pkg)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
    out = []
    for name in names:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        if name and name != cur:
            out.append(name)
    return out


def import_graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[m].update(_targets(mods, m, node))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=80)
    args = parser.parse_args()
    mods = modules()
    long, big = [], []
    for p in sorted(mods.values()):
        src = p.read_text()
        if len(src.splitlines()) > 500:
            big.append((len(src.splitlines()), str(p.relative_to(ROOT.parent))))
        if "cli" in p.relative_to(ROOT).parts[:-1]:
            continue
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if n > args.limit:
                    long.append((n, f"{p.relative_to(ROOT.parent)}:{node.lineno} {node.name}"))
    found = cycles(import_graph(mods))
    print(f"files over 500 lines: {len(big)} {sorted(big, reverse=True)}")
    print(f"functions over {args.limit} lines outside cli/: {len(long)}")
    for n, where in sorted(long, reverse=True):
        print(f"  {n} {where}")
    print(f"import cycles: {len(found)}")
    for c in found:
        print("  " + " <-> ".join(c))
    if long or len(big) > 3 or found:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
