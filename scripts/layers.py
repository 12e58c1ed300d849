"""The package's layers, read from its own imports: which folder imports which, and whether any
import runs back up a layer or closes a circle.

    python scripts/layers.py                 # the picture (Mermaid) and the checks, printed
    python scripts/layers.py --check         # exit status 1 when an import runs back up or is not allowed, a circle closes or a module is too long
    python scripts/layers.py --write docs/development.md   # the picture between its markers there

Every `import` and `from ... import` of xray_cls counts, at the top of a module or inside a
function alike (a lazy import is still a dependency); imports by name through importlib (the
command table of `__main__`) do not. tests/test_architecture.py runs the checks and compares the
picture in docs/development.md with this script's, so the picture cannot go stale.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import Counter
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "xray_cls"
# Bottom to top: a module may import its own folder and the folders it is allowed, all before it.
LAYERS = ["core", "runtime", "data", "metrics", "models", "training", "pretraining", "reports", "evaluation", "commands"]
ALLOWED = {
    "core": [],
    "runtime": ["core"],
    "data": ["core"],
    "metrics": ["core"],
    "models": ["core", "data", "metrics"],
    "training": ["core", "runtime", "data", "metrics", "models"],
    "pretraining": ["core", "runtime", "data", "metrics", "models", "training"],
    "reports": ["core", "runtime", "data", "metrics", "models", "training"],
    "evaluation": ["core", "runtime", "data", "metrics", "models", "training", "reports"],
    "commands": LAYERS[:-1],
}
MAX_LINES = 320  # "about 300": a room that fits on a screen or two
BEGIN, END = "<!-- layers:begin (python scripts/layers.py --write docs/development.md) -->", "<!-- layers:end -->"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The folder a module is in; the modules at the package's top are the commands."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else "commands"


def imports(path: Path) -> set[str]:
    """The xray_cls modules a file imports (a name imported from a package counts as its module when it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("xray_cls.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("xray_cls") and not node.level:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if (PACKAGE.parent / (submodule.replace(".", "/") + ".py")).is_file() else node.module)
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def back_up(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a later layer than the importer's."""
    return [f"{a} -> {b}" for a, targets in edges.items() for b in sorted(targets)
            if a != "xray_cls" and LAYERS.index(layer_of(b)) > LAYERS.index(layer_of(a))]


def not_allowed(edges: dict[str, set[str]]) -> list[str]:
    """Imports of a folder that the importer's folder may not import (ALLOWED)."""
    return [f"{a} -> {b}" for a, targets in edges.items() for b in sorted(targets)
            if a != "xray_cls" and layer_of(b) != layer_of(a) and layer_of(b) not in ALLOWED[layer_of(a)]]


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other in a circle (Tarjan's strongly connected components)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in edges:
        if node not in index:
            visit(node)
    return found


def too_long() -> list[str]:
    lengths = {module_name(p): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    return [f"{m} ({n} lines)" for m, n in sorted(lengths.items()) if n > MAX_LINES]


def table(edges: dict[str, set[str]]) -> str:
    """Each folder: its modules, what it may import, and what it imports today."""
    rows = ["| layer | modules | may import | imports |", "| --- | --- | --- | --- |"]
    for layer in reversed(LAYERS):
        members = [m for m in edges if m != "xray_cls" and layer_of(m) == layer]
        imported = {layer_of(b) for m in members for b in edges[m]} - {layer}
        today = [other for other in LAYERS if other in imported]
        rows.append(f"| {'xray_cls/*.py (the commands)' if layer == 'commands' else layer + '/'} | {len(members)} | "
                    f"{', '.join(ALLOWED[layer]) or 'nothing'} | {', '.join(today) or 'nothing'} |")
    return "\n".join(rows)


def picture(edges: dict[str, set[str]]) -> str:
    """A Mermaid flowchart of the layers, top first, each arrow an import between folders with its count."""
    between = Counter((layer_of(a), layer_of(b)) for a, targets in edges.items() if a != "xray_cls" for b in targets)
    modules = Counter(layer_of(m) for m in edges if m != "xray_cls")
    lines = ["```mermaid", "flowchart TD"]
    for layer in reversed(LAYERS):
        lines.append(f"    {layer}[\"{layer}/ ({modules[layer]} modules)\"]" if layer != "commands"
                     else f"    commands[\"commands: xray_cls/*.py ({modules[layer]} modules)\"]")
    for (a, b), count in sorted(between.items(), key=lambda item: (-LAYERS.index(item[0][0]), -LAYERS.index(item[0][1]))):
        if a != b:
            lines.append(f"    {a} -->|{count}| {b}")
    lines.append("```")
    return "\n".join(lines)


def problems(edges: dict[str, set[str]]) -> list[str]:
    return ([f"an import runs back up: {arrow}" for arrow in back_up(edges)]
            + [f"an import its folder may not make: {arrow}" for arrow in not_allowed(edges)]
            + [f"a circle of imports: {' -> '.join(group)}" for group in circles(edges)]
            + [f"a module over {MAX_LINES} lines: {module}" for module in too_long()])


def drawing(edges: dict[str, set[str]]) -> str:
    """The picture and the table, as docs/development.md shows them."""
    return picture(edges) + "\n\n" + table(edges)


def with_picture(text: str, drawing: str) -> str:
    """`text` with the picture between the markers."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + drawing + "\n" + text[end:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on an import back up, a circle or a too-long module")
    parser.add_argument("--write", type=Path, help="a Markdown file whose layers markers get the picture")
    args = parser.parse_args()
    edges = graph()
    found = problems(edges)
    if args.write:
        args.write.write_text(with_picture(args.write.read_text(), drawing(edges)))
    else:
        print(drawing(edges))
    for problem in found:
        print(problem, file=sys.stderr)
    print(f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(back_up(edges))} back up, "
          f"{len(not_allowed(edges))} not allowed, "
          f"{len(circles(edges))} circles, {len(too_long())} over {MAX_LINES} lines", file=sys.stderr)
    sys.exit(1 if args.check and found else 0)


if __name__ == "__main__":
    main()
