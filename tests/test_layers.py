"""Layers point one way: no module of `of_face` imports a higher layer, and no import circles.

Layer order (docs/ARCHITECTURE.md; a module may import its own layer and lower ones):

    0 base    of_face/__init__, _libs, oneflow_compat, parallel, io, scoring, strict_yaml, device, errors
    1 data    of_face/data/*
    2 models  of_face/models/*        (models/embed_graph.py: EmbedGraph, for export and verification)
    3 heads   of_face/heads/*
    4 config  of_face/config.py        (may import models to validate Model.*)
    5 run     of_face/run/*            (the run folder and one checkpoint's format)
    6 train   of_face/train/*
    7 export  of_face/export.py, of_face/onnx_surgery.py
    8 eval    of_face/eval/*
    9 top     of_face/report.py, of_face/cli.py

Every `import` / `from ... import` statement counts, also those inside functions (a lazy import
still ties the layers together). A new module must be given a layer here before it is used.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "of_face"
LAYERS = ["base", "data", "models", "heads", "config", "run", "train", "export", "eval", "top"]
# module (dotted) or package prefix (ending in ".") -> layer name; the longest match wins
RANKS = {
    "of_face": "base", "of_face._libs": "base", "of_face.oneflow_compat": "base", "of_face.parallel": "base",
    "of_face.io": "base", "of_face.scoring": "base", "of_face.strict_yaml": "base", "of_face.device": "base",
    "of_face.errors": "base",
    "of_face.data.": "data", "of_face.data": "data",
    "of_face.models.": "models", "of_face.models": "models",
    "of_face.heads.": "heads", "of_face.heads": "heads",
    "of_face.config": "config", "of_face.config_fields": "config",
    "of_face.run.": "run", "of_face.run": "run",
    "of_face.train.": "train", "of_face.train": "train",
    "of_face.export": "export", "of_face.onnx_surgery": "export",
    "of_face.eval.": "eval", "of_face.eval": "eval",
    "of_face.report": "top", "of_face.cli": "top",
}


def module_name(path):
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules():
    """{dotted name: path} of every .py file under of_face/."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def rank(module):
    """Layer index of a module, or None when it has none (a new module not placed yet)."""
    if module in RANKS:
        return LAYERS.index(RANKS[module])
    prefixes = [p for p in RANKS if p.endswith(".") and module.startswith(p)]
    return LAYERS.index(RANKS[max(prefixes, key=len)]) if prefixes else None


def _resolve(name, known):
    """The of_face module a dotted name refers to: itself if it is a module, else its parent
    (`from of_face.models import build_backbone` -> of_face.models)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports(module, path, known):
    """[(imported of_face module, line)] for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, up level - 1 more
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix for a in node.names]
        else:
            continue
        for target in targets:
            if target == "of_face" or target.startswith("of_face."):
                resolved = _resolve(target, known)
                if resolved and resolved != module and (resolved, node.lineno) not in out:
                    out.append((resolved, node.lineno))
    return out


def graph():
    known = modules()
    return known, {m: imports(m, p, known) for m, p in known.items()}


def _where(known, module, line):
    return f"{known[module].relative_to(PACKAGE.parent)}:{line}"


def test_every_module_has_a_layer():
    unplaced = [m for m in modules() if rank(m) is None]
    assert not unplaced, f"give these modules a layer in tests/test_layers.py RANKS: {unplaced}"


def test_no_module_imports_a_higher_layer():
    known, edges = graph()
    bad = []
    for module, targets in edges.items():
        for target, line in targets:
            r_from, r_to = rank(module), rank(target)
            if r_from is not None and r_to is not None and r_to > r_from:
                bad.append(f"{module} ({LAYERS[r_from]}) -> {target} ({LAYERS[r_to]}) at {_where(known, module, line)}")
    assert not bad, "upward imports:\n  " + "\n  ".join(bad)


def find_cycles(edges):
    """Strongly connected components of more than one module (Tarjan), each as a cycle path."""
    adj = {m: sorted({t for t, _ in ts}) for m, ts in edges.items()}
    index, low, stack, on_stack, comps, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in adj.get(v, []):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:  # one concrete circle through the component, for the message
        members, start = set(comp), comp[0]
        path, seen = [start], {start}
        while True:
            nxt = next(w for w in adj[path[-1]] if w in members)
            if nxt in seen:
                cycles.append(path[path.index(nxt):] + [nxt])
                break
            path.append(nxt)
            seen.add(nxt)
    return cycles


def test_no_import_cycles():
    known, edges = graph()
    cycles = find_cycles(edges)
    lines = []
    for cycle in cycles:
        hops = []
        for a, b in zip(cycle, cycle[1:]):
            line = next(ln for t, ln in edges[a] if t == b)
            hops.append(f"{a} -> {b} ({_where(known, a, line)})")
        lines.append("; ".join(hops))
    assert not cycles, "import cycles:\n  " + "\n  ".join(lines)


@pytest.mark.parametrize("src, want", [
    ({"a": [("b", 1)], "b": [("c", 1)], "c": [("a", 1)], "d": [("a", 1)]}, [["a", "b", "c", "a"]]),
    ({"a": [("b", 1)], "b": []}, []),
])
def test_find_cycles_itself(src, want):
    assert find_cycles(src) == want
