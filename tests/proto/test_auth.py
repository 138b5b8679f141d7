"""proto/auth.py: where secrets come from (never only argv) and what a token may be."""

from __future__ import annotations

import pytest

from proto import auth


def test_secret_order_value_file_env_env_file(tmp_path):
    f1, f2 = tmp_path / "a", tmp_path / "b"
    f1.write_text("from-file\n")
    f2.write_text("from-env-file\r\n")
    env = {"STEPWATCH_TOKEN": "from-env", "STEPWATCH_TOKEN_FILE": str(f2)}
    assert auth.read_secret("given", f1, environ=env) == "given"
    assert auth.read_secret(None, f1, environ=env) == "from-file"
    assert auth.read_secret(None, None, environ=env) == "from-env"
    assert auth.read_secret(None, None, environ={"STEPWATCH_TOKEN_FILE": str(f2)}) == (
        "from-env-file"
    )
    assert auth.read_secret(None, None, environ={"STEPWATCH_TOKEN": ""}) is None
    op = {"STEPWATCH_OPERATOR_TOKEN": "op", "STEPWATCH_TOKEN": "rank"}
    assert auth.read_secret(env=auth.OPERATOR_TOKEN_ENV, environ=op) == "op"


@pytest.mark.parametrize("bad", ["", " padded", "two\nlines", "tab\tbed", "ünï"])
def test_a_token_must_travel_as_a_header(bad, tmp_path):
    with pytest.raises(ValueError, match="printable ASCII"):
        auth.read_secret(bad, environ={})
    (tmp_path / "t").write_text(bad + "\n")
    if bad.strip():
        with pytest.raises(ValueError, match="printable ASCII"):
            auth.read_secret(None, tmp_path / "t", environ={})


def test_an_unreadable_file_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read the token file"):
        auth.read_secret(None, tmp_path / "missing", environ={})


def test_client_credentials(tmp_path):
    assert auth.client_credentials(environ={}) is None  # plaintext unless asked
    assert auth.client_credentials(tls=True, environ={}) is not None  # system roots
    with pytest.raises(ValueError, match="TLS CA"):
        auth.client_credentials(environ={"STEPWATCH_TLS_CA": str(tmp_path / "none.pem")})
    assert auth.bearer("t") == (("authorization", "Bearer t"),) and auth.bearer(None) == ()
