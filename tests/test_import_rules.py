"""DESIGN.md's import rules between top-level packages, checked on the source (AST)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = {"proto", "model", "hooks", "store", "analytics", "collector", "dashboard", "benchmarks"}

# package -> packages of ours it must never import (DESIGN.md "Layout" and "Never" lines)
FORBIDDEN = {
    "proto": OURS - {"proto"},
    "hooks": {"collector", "store", "analytics", "dashboard", "model", "benchmarks"},
    "store": OURS - {"store"},
    "analytics": {"collector", "hooks", "model", "dashboard", "proto", "benchmarks"},
    "model": {"collector", "store", "dashboard", "analytics", "proto", "benchmarks"},
    "collector": {"hooks", "model", "dashboard", "benchmarks"},
    "dashboard": {"collector", "hooks", "model", "proto", "benchmarks"},
}
THIRD_PARTY_FORBIDDEN = {"analytics": {"torch", "grpc"}}


def imported_top_levels(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_respects_import_rules(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        # model/train.py's CLI may load hooks lazily to honour --monitor; the loop itself never does
        imports = imported_top_levels(path)
        banned = FORBIDDEN[package] | THIRD_PARTY_FORBIDDEN.get(package, set())
        bad += [f"{path.relative_to(ROOT)} imports {name}" for name in sorted(imports & banned)]
    assert not bad, "\n".join(bad)
