"""The shape of the package's code: the longest functions and the internal import graph (modules, edges, cycles).

Reads ``moecompress/`` as text (ast), imports nothing. Prints the longest functions and a graph summary, and writes
``reports/code_shape.json`` so a refactor can state its before and after.

    .venv/bin/python bench/code_shape.py [--top 15] [--out reports/code_shape.json]
    git worktree add /tmp/before e174ab2 && .venv/bin/python bench/code_shape.py --root /tmp/before \
        --out reports/code_shape.before.json       # the tree before the engine refactor (issue 11)
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "moecompress"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "calibration":  # installed as moecompress.calibration
        parts = [PKG, *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(mod: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def scan(files: list[Path]) -> tuple[list[dict], dict[str, set[str]]]:
    funcs: list[dict] = []
    graph: dict[str, set[str]] = {}
    mods = {module_name(f): f for f in files}
    for mod, f in mods.items():
        tree = ast.parse(f.read_text(encoding="utf-8"))
        deps = graph.setdefault(mod, set())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                funcs.append({"function": f"{mod}.{node.name}", "lines": node.end_lineno - node.lineno + 1,
                              "params": len(node.args.args) + len(node.args.kwonlyargs)})  # fmt: skip
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                target = resolve(mod, f.name == "__init__.py", node)
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
            deps.update(t for t in targets if t in mods and t != mod)
    funcs.sort(key=lambda r: -r["lines"])
    return funcs, graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> None:
    global ROOT
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "code_shape.json")
    ap.add_argument("--root", type=Path, default=None, help="another checkout to measure (e.g. a git worktree)")
    args = ap.parse_args()
    if args.root is not None:
        ROOT = args.root.resolve()
    files = sorted((ROOT / PKG).rglob("*.py")) + sorted((ROOT / "calibration").rglob("*.py"))
    funcs, graph = scan(files)
    cyc = cycles(graph)
    edges = sum(len(v) for v in graph.values())
    lines = sum(len(f.read_text(encoding="utf-8").splitlines()) for f in files)
    print(f"{len(graph)} modules, {lines:,} lines, {edges} internal import edges, {len(cyc)} import cycles")
    for c in cyc:
        print("  cycle:", " <-> ".join(c))
    print(f"\n{'lines':>5} {'params':>6}  function")
    for r in funcs[: args.top]:
        print(f"{r['lines']:>5} {r['params']:>6}  {r['function']}")
    record = {
        "modules": len(graph),
        "lines": lines,
        "import_edges": edges,
        "cycles": cyc,
        "longest_functions": funcs[: args.top],
        "graph": {k: sorted(v) for k, v in sorted(graph.items())},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
