"""The bare distribution is the client a training job installs: torch, grpcio, protobuf, numpy.

A fresh virtualenv gets `pip install <this tree>` (no extras; offline where the pip cache and the
local wheel directories hold the pins, which is how `make venv` installed them), and must then
import `hooks.Monitor` without any of the collector's, the stores' or the dashboard's libraries
being present.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVER_SIDE = ("streamlit", "polars", "pyarrow", "clickhouse_driver", "pandas")
TREE = ("pyproject.toml", "README.md", "proto", "model", "hooks", "store", "analytics",
        "collector", "dashboard", "benchmarks")  # fmt: skip


def _copy_tree(dest: Path) -> None:
    """The package sources only (an in-place build would write build/ and *.egg-info here)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    dest.mkdir()
    for name in TREE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copy2(src, dest / name)


@pytest.mark.slow
def test_bare_install_is_the_client_only(tmp_path):
    src, env_dir = tmp_path / "src", tmp_path / "venv"
    _copy_tree(src)
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    pip = subprocess.run(
        [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(src)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    probe = (
        "import importlib.util, json, hooks\n"
        "assert hooks.Monitor.__name__ == 'Monitor'\n"
        f"print(json.dumps({{n: importlib.util.find_spec(n) is not None for n in {SERVER_SIDE!r}}}))"
    )
    out = subprocess.run(
        [str(py), "-c", probe], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    present = {name for name, found in json.loads(out.stdout).items() if found}
    assert present == set(), f"the bare install pulled server-side packages: {sorted(present)}"
    # and the venv running this test is not what answered: the probe ran the fresh interpreter
    assert Path(sys.executable).resolve() != py.resolve()
