"""The package's folders are layers: imports point down the pipeline only, and never in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "smtpgate"

# A module may import from its own folder and from layers of a lower rank.
RANK = {"": 0, "checks": 1, "lookups": 2, "relay": 2, "policy": 3, "smtp": 4, "cli": 5,
        "service": 5}
# cli runs the service (`smtpgate serve`); the two are the edges, side by side.
ALLOWED_SIDEWAYS = {("cli", "service")}


def _layer(module: str) -> str:
    if module == "smtpgate.__main__":
        return "cli"
    parts = module.split(".")[1:]
    return parts[0] if len(parts) > 1 and parts[0] in RANK else ""


def _imports() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(p for p in rel.parts if p != "__init__")
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and \
                    node.module.startswith("smtpgate"):
                for alias in node.names:
                    candidate = f"{node.module}.{alias.name}"
                    sub = PACKAGE.parent / Path(*candidate.split("."))
                    is_module = sub.with_suffix(".py").exists() or sub.is_dir()
                    targets.add(candidate if is_module else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("smtpgate")}
        found[name] = targets
    return found


IMPORTS = _imports()


@pytest.mark.parametrize("module", sorted(IMPORTS))
def test_imports_point_down(module):
    here = _layer(module)
    for target in IMPORTS[module]:
        there = _layer(target)
        if there == here or target == "smtpgate" or (here, there) in ALLOWED_SIDEWAYS:
            continue
        assert RANK[there] < RANK[here], f"{module} imports {target}: {here or 'top'} " \
            f"may not use {there or 'top'}"


def test_no_import_cycle():
    graph = {m: {t for t in ts if t in IMPORTS and t != m} for m, ts in IMPORTS.items()}
    seen: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        seen[node] = 1
        for nxt in graph[node]:
            if seen.get(nxt) == 1:
                cycle = [*trail[trail.index(nxt):], nxt] if nxt in trail else [node, nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in seen:
                visit(nxt, [*trail, nxt])
        seen[node] = 2

    for module in sorted(graph):
        if module not in seen:
            visit(module, [module])


def test_the_rule_sees_every_import():
    # a sanity check on the parser: the engine does use the policy's vocabulary
    assert "smtpgate.verdict" in IMPORTS["smtpgate.smtp.session"]
