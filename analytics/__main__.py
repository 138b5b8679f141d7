"""`python -m analytics ...`: offline analysis of a stored run.

    python -m analytics report --store URL --run NAME --out report.html [--json F]
    python -m analytics events --store URL --run NAME        (offline detector events, CSV,
                                                              with decision and incident)
    python -m analytics events --store URL --run NAME --incidents   (the incidents, CSV:
                                                              each with its origin, headline first)

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
    e.add_argument(
        "--incidents", action="store_true", help="print the incidents instead of the events"
    )
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

                from analytics.incidents import summarize
                from analytics.offline import detect_offline

                events = detect_offline(store, args.run)
                if args.incidents:
                    rows = [_incident_row(i.to_dict()) for i in summarize(events)]
                    columns = _INCIDENT_COLUMNS
                else:
                    rows = [_event_row(e) for e in events]
                    columns = _COLUMNS
                sys.stdout.write(pl.DataFrame(rows or None, schema=list(columns)).write_csv())
    except (NotFound, InvalidInput) as exc:
        msg = exc.args[0] if isinstance(exc, NotFound) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


_COLUMNS = {
    "step": int,
    "kind": str,
    "site": str,
    "value": float,
    "threshold": float,
    "severity": str,
    "onset_step": int,
    "confidence": float,
    "decision": str,
    "incident": int,
    "detail": str,
}
_INCIDENT_COLUMNS = {
    "incident": int,
    "origin_kind": str,
    "origin_site": str,
    "layer": int,
    "expert": int,
    "began": int,
    "detected": int,
    "cause": str,
    "severity": str,
    "clamped": bool,
    "events": int,
    "explanation": str,
}


def _event_row(e) -> dict:
    import json

    return {
        "step": e.step,
        "kind": e.kind,
        "site": e.site,
        "value": e.value,
        "threshold": e.threshold,
        "severity": e.severity,
        "onset_step": e.onset_step,
        "confidence": e.confidence,
        "decision": e.decision,
        "incident": e.incident,
        "detail": json.dumps(e.detail, sort_keys=True),
    }


def _incident_row(i: dict) -> dict:
    o = i["origin"]
    return {
        "incident": i["id"],
        "origin_kind": o["kind"],
        "origin_site": o["site"],
        "layer": o["layer"],
        "expert": o["expert"],
        "began": o["onset_step"],
        "detected": o["detected_step"],
        "cause": i["cause"],
        "severity": i["severity"],
        "clamped": i["clamped"],
        "events": i["events"],
        "explanation": i["explanation"],
    }


if __name__ == "__main__":
    sys.exit(main())
