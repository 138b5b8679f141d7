"""Who may see the dashboard: a shared password, or an authenticating reverse proxy, as
Streamlit deployments do it (Streamlit has no login of its own for a self-hosted app).

    password     $STEPWATCH_DASHBOARD_PASSWORD, or the file $STEPWATCH_DASHBOARD_PASSWORD_FILE
                 names (`python -m dashboard --password-file F` sets the latter): the page asks
                 for it before anything of the store is read; compared in constant time.
    auth proxy   $STEPWATCH_DASHBOARD_AUTH_HEADER (`--auth-header X-Forwarded-User`): a proxy
                 in front (oauth2-proxy, an nginx auth_request, a cloud IAP) authenticates and
                 sets that header; a request without it sees nothing. Only sound when nothing
                 but the proxy can reach the dashboard's port: __main__ refuses to bind it to
                 a non-loopback address.

`gate()` is the first thing the app does after set_page_config; it returns only for a request
that may see the page.
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

import streamlit as st

PASSWORD_ENV = "STEPWATCH_DASHBOARD_PASSWORD"
PASSWORD_FILE_ENV = "STEPWATCH_DASHBOARD_PASSWORD_FILE"
AUTH_HEADER_ENV = "STEPWATCH_DASHBOARD_AUTH_HEADER"


def password(environ: Mapping[str, str] | None = None) -> str | None:
    """The configured password, or None; ValueError for an unreadable or empty file."""
    environ = os.environ if environ is None else environ
    if environ.get(PASSWORD_ENV):
        return environ[PASSWORD_ENV]
    path = environ.get(PASSWORD_FILE_ENV)
    if not path:
        return None
    try:
        value = Path(path).read_text().rstrip("\r\n")
    except OSError as exc:
        raise ValueError(f"cannot read the password file {path!r}: {exc.strerror}") from None
    if not value:
        raise ValueError(f"the password file {path!r} is empty")
    return value


def auth_header(environ: Mapping[str, str] | None = None) -> str | None:
    environ = os.environ if environ is None else environ
    return environ.get(AUTH_HEADER_ENV) or None


def matches(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def gate() -> None:
    """Stop the script run unless this request may see the dashboard."""
    header = auth_header()
    if header is not None:
        user = st.context.headers.get(header)
        if not user:
            st.error(f"not authenticated: this dashboard expects the {header} header")
            st.stop()
        st.sidebar.caption(f"signed in as {user}")
        return
    expected = password()
    if expected is None or st.session_state.get("signed_in"):
        return

    def check() -> None:
        ok = matches(st.session_state.get("password", ""), expected)
        st.session_state.signed_in = ok
        st.session_state.password_wrong = not ok
        st.session_state.password = ""  # never kept in the session

    st.text_input("Password", type="password", key="password", on_change=check)
    if st.session_state.get("password_wrong"):
        st.error("wrong password")
    st.stop()
