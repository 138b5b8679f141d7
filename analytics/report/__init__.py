"""The offline anomaly report: `python -m analytics report --store URL --run NAME --out F`.

findings.py   read a stored run, replay the detectors, derive the findings (data)
svg.py        hand-written SVG line charts and PNG heatmaps (no plotting dependency)
html.py       the self-contained page; the findings also go to a JSON twin
"""

from __future__ import annotations

import json
from pathlib import Path

from analytics.report.findings import collect, findings
from analytics.report.html import render


def write_report(store, run: str, out: str | Path, json_out: str | Path | None = None) -> dict:
    """Write the HTML report (and its JSON twin, default: out with .json); returns findings."""
    data = collect(store, run)
    found = findings(data)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(data, found), encoding="utf-8")
    twin = Path(json_out) if json_out else out.with_suffix(".json")
    twin.write_text(json.dumps(found, indent=1, sort_keys=True), encoding="utf-8")
    return found
