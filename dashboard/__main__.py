"""`python -m dashboard --store URL [streamlit options]`: serve the dashboard.

    python -m dashboard --store parquet:runs/demo-store
    python -m dashboard --store clickhouse://stepwatch@clickhouse:9000/stepwatch \\
        --server.port 8501 --server.address 0.0.0.0

Everything but --store goes to `streamlit run` (e.g. --server.port, --server.headless). The
store is opened once here first, so a wrong URL or an unreachable server is one clear line on
stderr and exit code 2, not a traceback in a browser tab. Streamlit's usage statistics are off
unless asked for: the dashboard has no business calling out of the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from store import StoreError, open_store

APP = Path(__file__).resolve().with_name("app.py")
DEFAULTS = (
    ("--browser.gatherUsageStats", "false"),  # no calls out of the machine
    ("--client.toolbarMode", "viewer"),
)  # no "Deploy" button on a monitoring page


def parse(argv: list[str]) -> tuple[str, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m dashboard",
        description=__doc__.splitlines()[0],
        epilog="other options are passed to `streamlit run`",
    )
    p.add_argument(
        "--store", required=True, help="store URL: parquet:DIR or clickhouse://USER@HOST:PORT/DB"
    )
    args, streamlit_args = p.parse_known_args(argv)
    for option, value in DEFAULTS:
        if not any(a.startswith(option) for a in streamlit_args):
            streamlit_args += [option, value]
    return args.store, streamlit_args


def main(argv: list[str] | None = None) -> int:
    url, streamlit_args = parse(sys.argv[1:] if argv is None else argv)
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
