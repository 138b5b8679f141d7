"""`python -m analytics ...`: offline analysis of a stored run.

    python -m analytics report --store URL --run NAME --out report.html [--json F]
    python -m analytics events --store URL --run NAME        (offline detector events, CSV)

The report is one self-contained HTML file (opens offline) with a JSON twin of its findings
(default: the --out path with .json). An unknown run exits 2.
"""

from __future__ import annotations

import argparse
import sys

from store import InvalidInput, NotFound, StoreError, open_store


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m analytics", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("report", help="write the anomaly report of a run")
    e = sub.add_parser("events", help="replay the detectors over a stored run, print CSV")
    for p in (r, e):
        p.add_argument("--store", required=True, help='"parquet:DIR", "clickhouse://..."')
        p.add_argument("--run", required=True)
    r.add_argument("--out", required=True, help="the HTML file to write")
    r.add_argument("--json", help="the JSON twin (default: --out with .json)")
    args = ap.parse_args(argv)
    try:
        with open_store(args.store) as store:
            if args.command == "report":
                from analytics.report import write_report

                found = write_report(store, args.run, args.out, args.json)
                n = len(found["events"])
                print(
                    f"wrote {args.out} ({n} event(s); origin: "
                    f"{found['origin']['explanation'] if found['origin'] else 'none'})"
                )
            else:
                import polars as pl

                from analytics.events import to_records
                from analytics.offline import detect_offline

                recs = to_records(detect_offline(store, args.run))
                sys.stdout.write(
                    pl.DataFrame(
                        [r.__dict__ for r in recs] or None, schema=list(_COLUMNS)
                    ).write_csv()
                )
    except (NotFound, InvalidInput) as exc:
        msg = exc.args[0] if isinstance(exc, NotFound) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


_COLUMNS = ("step", "kind", "site", "value", "threshold", "severity", "onset_step", "detail")

if __name__ == "__main__":
    sys.exit(main())
