"""The dashboard's gate (dashboard/auth.py) driven through Streamlit's AppTest: with a
password configured nothing of the store shows before it is given, a wrong one is refused, the
right one opens the page and is not kept; behind an auth proxy a request without its header
sees nothing."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from dashboard import auth
from tests.dashboard.conftest import APP, check


def app(url: str, monkeypatch, **env: str) -> AppTest:
    monkeypatch.setenv("STEPWATCH_STORE", url)
    for name in (auth.PASSWORD_ENV, auth.PASSWORD_FILE_ENV, auth.AUTH_HEADER_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return AppTest.from_file(APP, default_timeout=120)


def test_nothing_shows_before_the_password(recorded, monkeypatch, tmp_path):
    secret = tmp_path / "pw"
    secret.write_text("c0rrect horse\n")
    at = app(recorded.url, monkeypatch, **{auth.PASSWORD_FILE_ENV: str(secret)}).run()
    assert not at.exception and len(at.text_input) == 1
    assert len(at.multiselect) == 0 and len(at.sidebar.markdown) == 0  # no runs, no store URL

    at.text_input(key="password").input("wrong").run()
    assert [e.value for e in at.error] == ["wrong password"] and len(at.multiselect) == 0

    check(at.text_input(key="password").input("c0rrect horse").run())
    assert at.multiselect(key="runs").value == ["tiny-b"]  # the page itself
    assert at.session_state["password"] == ""  # the password is not kept in the session
    check(at.run())  # signed in for the rest of the session
    assert len(at.text_input) == 0 and at.multiselect(key="runs").value == ["tiny-b"]


def test_behind_an_auth_proxy_a_request_without_its_header_sees_nothing(recorded, monkeypatch):
    at = app(recorded.url, monkeypatch, **{auth.AUTH_HEADER_ENV: "X-Forwarded-User"}).run()
    assert not at.exception
    assert [e.value for e in at.error] == [
        "not authenticated: this dashboard expects the X-Forwarded-User header"
    ]
    assert len(at.multiselect) == 0


def test_without_auth_options_the_page_opens(recorded, monkeypatch):
    at = check(app(recorded.url, monkeypatch).run())
    assert len(at.text_input) == 0 and at.multiselect(key="runs").value == ["tiny-b"]
