"""`python -m dashboard`: options pass through to Streamlit, a bad store is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from dashboard import auth, reads
from dashboard.__main__ import Refused, configure, main, parse
from tests.dashboard.conftest import ROOT


def test_streamlit_options_pass_through_and_defaults_fill_in():
    args, rest = parse(
        ["--store", "parquet:/x", "--server.port", "8501", "--browser.gatherUsageStats", "true"]
    )
    assert args.store == "parquet:/x"
    assert rest == [
        "--server.port",
        "8501",
        "--browser.gatherUsageStats",
        "true",
        "--server.address",
        "127.0.0.1",
        "--client.toolbarMode",
        "viewer",
    ]
    _, rest = parse(["--store", "parquet:/x"])
    assert rest == [
        "--server.address",
        "127.0.0.1",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "viewer",
    ]


@pytest.mark.parametrize(
    ("argv", "environ", "refused"),
    [
        ([], {}, None),  # loopback by default: fine without a password
        (["--server.address", "0.0.0.0"], {}, "password"),
        (["--server.address=10.1.2.3"], {}, "password"),
        (["--server.address", "0.0.0.0", "--insecure"], {}, None),
        (["--server.address", "0.0.0.0"], {"STEPWATCH_DASHBOARD_PASSWORD": "pw"}, None),
        (["--auth-header", "X-Forwarded-User"], {}, None),
        (["--auth-header", "X-Forwarded-User", "--server.address", "0.0.0.0"], {}, "header"),
    ],
)
def test_a_non_loopback_dashboard_needs_a_password(argv, environ, refused):
    args, rest = parse(["--store", "parquet:/x", *argv])
    if refused is None:
        configure(args, rest, environ=environ)
    else:
        with pytest.raises(Refused, match=refused):
            configure(args, rest, environ=environ)


def test_the_password_file_reaches_the_app_through_the_environment(tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("hunter2\n")
    args, rest = parse(
        ["--store", "parquet:/x", "--password-file", str(secret), "--server.address", "::"]
    )
    environ: dict = {}
    configure(args, rest, environ=environ)
    assert environ == {auth.PASSWORD_FILE_ENV: str(secret)}
    assert auth.password(environ) == "hunter2" and "hunter2" not in " ".join(rest)
    args, rest = parse(["--store", "parquet:/x", "--password-file", str(tmp_path / "none")])
    with pytest.raises(ValueError, match="cannot read the password file"):
        configure(args, rest, environ={})


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
