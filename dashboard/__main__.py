"""`python -m dashboard --store URL [auth options] [streamlit options]`: serve the dashboard.

    python -m dashboard --store parquet:runs/demo-store
    python -m dashboard --store clickhouse://stepwatch@clickhouse:9000/stepwatch \\
        --password-file /run/secrets/dashboard --server.address 0.0.0.0

Everything but --store and the auth options goes to `streamlit run` (e.g. --server.port,
--server.headless). The store is opened once here first, so a wrong URL or an unreachable
server is one clear line on stderr and exit code 2, not a traceback in a browser tab.
Streamlit's usage statistics are off unless asked for: the dashboard has no business calling
out of the machine.

Who can see it (dashboard/auth.py): it listens on 127.0.0.1 unless --server.address says
otherwise, and it refuses a non-loopback address unless a password protects it
(--password-file, $STEPWATCH_DASHBOARD_PASSWORD(_FILE)) or --insecure says that is meant.
Behind an authenticating proxy, --auth-header NAME trusts the user the proxy puts in that
header; the dashboard then only listens on loopback, where nothing but the proxy reaches it.
TLS: Streamlit's own --server.sslCertFile/--server.sslKeyFile, or the proxy (README).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from dashboard import auth
from store import StoreError, open_store

APP = Path(__file__).resolve().with_name("app.py")
DEFAULTS = (
    ("--server.address", "127.0.0.1"),  # loopback unless asked: a port is not an audience
    ("--browser.gatherUsageStats", "false"),  # no calls out of the machine
    ("--client.toolbarMode", "viewer"),
)  # no "Deploy" button on a monitoring page


class Refused(ValueError):
    """An exposure the options do not protect."""


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m dashboard",
        description=__doc__.splitlines()[0],
        epilog="other options are passed to `streamlit run`",
    )
    p.add_argument(
        "--store", required=True, help="store URL: parquet:DIR or clickhouse://USER@HOST:PORT/DB"
    )
    p.add_argument(
        "--password-file",
        metavar="FILE",
        help="file holding the password the page asks for "
        f"(default: ${auth.PASSWORD_ENV}, else the file ${auth.PASSWORD_FILE_ENV} names)",
    )
    p.add_argument(
        "--auth-header",
        metavar="NAME",
        help="trust the user an authenticating proxy sets in this header (loopback only)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback --server.address without a password",
    )
    args, streamlit_args = p.parse_known_args(argv)
    for option, value in DEFAULTS:
        if not any(a.startswith(option) for a in streamlit_args):
            streamlit_args += [option, value]
    return args, streamlit_args


def address_of(streamlit_args: list[str]) -> str:
    """The --server.address the dashboard will listen on (`--opt value` or `--opt=value`)."""
    for i, a in enumerate(streamlit_args):
        if a.startswith("--server.address="):
            return a.split("=", 1)[1]
        if a == "--server.address" and i + 1 < len(streamlit_args):
            return streamlit_args[i + 1]
    return "127.0.0.1"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def configure(args: argparse.Namespace, streamlit_args: list[str], environ=os.environ) -> None:
    """Put the auth options where the app reads them (the environment of this process: never
    a secret on argv) and refuse an unprotected exposure (Refused)."""
    if args.password_file:
        environ[auth.PASSWORD_FILE_ENV] = str(Path(args.password_file).resolve())
    if args.auth_header:
        environ[auth.AUTH_HEADER_ENV] = args.auth_header
    host = address_of(streamlit_args)
    has_password = auth.password(environ) is not None  # a bad file fails here, at start
    if auth.auth_header(environ) is not None:
        if not is_loopback(host):
            raise Refused(
                f"--auth-header trusts a header anyone who reaches {host} could set: listen "
                "on loopback (the proxy's side) or protect it with a password instead"
            )
    elif not (has_password or args.insecure or is_loopback(host)):
        raise Refused(
            f"listening on {host} would show every run to anyone who reaches it: give a "
            "--password-file (or $STEPWATCH_DASHBOARD_PASSWORD), put it behind an auth proxy "
            "(--auth-header on loopback), or pass --insecure"
        )


def main(argv: list[str] | None = None) -> int:
    args, streamlit_args = parse(sys.argv[1:] if argv is None else argv)
    try:
        configure(args, streamlit_args)
    except ValueError as e:  # Refused, or an unreadable password file
        print(f"python -m dashboard: {e}", file=sys.stderr)
        return 2
    url = args.store
    try:
        open_store(url).close()
    except StoreError as e:  # InvalidInput (bad URL) is a StoreError too
        print(f"python -m dashboard: cannot open store: {e}", file=sys.stderr)
        return 2
    from streamlit.web import cli as stcli  # heavy; only once the store is known good

    sys.argv = ["streamlit", "run", str(APP), *streamlit_args, "--", "--store", url]
    return stcli.main()


if __name__ == "__main__":
    sys.exit(main())
