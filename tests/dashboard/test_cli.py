"""`python -m dashboard`: options pass through to Streamlit, a bad store is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys

from dashboard import reads
from dashboard.__main__ import main, parse
from tests.dashboard.conftest import ROOT


def test_streamlit_options_pass_through_and_defaults_fill_in():
    url, rest = parse(
        ["--store", "parquet:/x", "--server.port", "8501", "--browser.gatherUsageStats", "true"]
    )
    assert url == "parquet:/x"
    assert rest == [
        "--server.port",
        "8501",
        "--browser.gatherUsageStats",
        "true",
        "--client.toolbarMode",
        "viewer",
    ]
    _, rest = parse(["--store", "parquet:/x"])
    assert rest == ["--browser.gatherUsageStats", "false", "--client.toolbarMode", "viewer"]


def test_a_bad_store_url_is_one_line_and_exit_2(capsys):
    assert main(["--store", "mysql://nope"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unsupported store URL 'mysql://nope'" in err[0]


def test_missing_store_is_a_usage_error():
    out = subprocess.run(
        [sys.executable, "-m", "dashboard"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2 and "--store" in out.stderr


def test_passwords_never_reach_the_page():
    assert reads.display_url("clickhouse://u:s3cret@h:9000/db") == "clickhouse://u@h:9000/db"
    assert reads.display_url("clickhouse://u@h:9000/db") == "clickhouse://u@h:9000/db"
    assert reads.display_url("parquet:/data/x") == "parquet:/data/x"
