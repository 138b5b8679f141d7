"""`make check`'s gates bite: the project's ruff and mypy configuration reject a planted lint
error and a planted type error (CI runs the same tools over the tree with that configuration)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CLEAN = "def double(x: int) -> int:\n    return 2 * x\n"
LINT_ERROR = "import os\n\n\n" + CLEAN  # F401: unused import
TYPE_ERROR = CLEAN + '\n\ny: int = double("two")\n'  # str where int is declared


def _tool(name: str) -> str:
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}: `make venv` installs the dev extra")
    return str(path)


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=300)


@pytest.fixture
def planted(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "planted.py"
        path.write_text(text)
        return str(path)

    return write


def test_ruff_rejects_a_planted_lint_error(planted):
    config = ["--config", str(ROOT / "pyproject.toml")]
    assert _run([_tool("ruff"), "check", *config, planted(CLEAN)]).returncode == 0
    out = _run([_tool("ruff"), "check", *config, planted(LINT_ERROR)])
    assert out.returncode == 1 and "F401" in out.stdout, out.stdout + out.stderr


def test_ruff_format_rejects_unformatted_code(planted):
    config = ["--config", str(ROOT / "pyproject.toml")]
    assert _run([_tool("ruff"), "format", "--check", *config, planted(CLEAN)]).returncode == 0
    out = _run(
        [_tool("ruff"), "format", "--check", *config, planted(CLEAN.replace("2 * x", "2*x"))]
    )
    assert out.returncode == 1, out.stdout + out.stderr


def test_mypy_rejects_a_planted_type_error(planted, tmp_path):
    config = ["--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / "c")]
    assert _run([_tool("mypy"), *config, planted(CLEAN)]).returncode == 0
    out = _run([_tool("mypy"), *config, planted(TYPE_ERROR)])
    assert out.returncode == 1 and "[arg-type]" in out.stdout, out.stdout + out.stderr


def test_ci_runs_the_gates_before_the_tests():
    lines = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines.index("make check") < lines.index("make test")
    assert shutil.which("make") is not None
