"""The anomaly report as one self-contained HTML page (inline SVG and PNG, no scripts, no
network) plus its JSON twin.

    render(data, found) -> str       data: findings.RunData, found: findings.findings(data)
"""

from __future__ import annotations

import json
import math

import numpy as np

from analytics.events import EXPERT_REVIVAL
from analytics.report.findings import RunData
from analytics.report.svg import SEVERITY_COLOR, esc, heatmap, line_chart

USER_STAT = "user"  # the stat label of the metrics a run logged with monitor.log

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;
 color:#222;max-width:1100px}
h1{font-size:22px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px;margin:8px 0}
td,th{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
th{background:#f4f4f4} .critical{color:#b00020;font-weight:bold} .warning{color:#a85a00}
.info{color:#2e7d32} .note{color:#555;font-size:12px} figure{margin:8px 0}
code{background:#f4f4f4;padding:0 3px}
"""


def _table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return '<p class="note">none</p>'
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = []
    for r in rows:
        cls = r.get("severity", "")
        body.append(
            "<tr>"
            + "".join(
                f'<td class="{esc(cls) if c == "severity" else ""}">{esc(_cell(r.get(c)))}</td>'
                for c in cols
            )
            + "</tr>"
        )
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k}={_cell(x)}" for k, x in v.items() if x is not None)
    if isinstance(v, list):
        return "; ".join(_cell(x) for x in v)
    return "" if v is None else str(v)


def _grids(d: RunData, stat: str) -> tuple[np.ndarray, list[str], list[tuple[int, str]]]:
    """[rows = (layer, expert), steps] of a per-expert stat, with row labels and groups."""
    ids = d.index.expert_grid("moe/", stat)
    layers = d.index.moe_layers
    L, E = ids.shape
    vals = np.full((L, E, d.steps.size), np.nan)
    ok = ids >= 0
    vals[ok] = d.values[:, ids[ok]].T
    labels = [f"L{l} e{e}" for l in layers for e in range(E)]
    groups = [(r * E, f"layer {l}") for r, l in enumerate(layers)]
    return vals, labels, groups


def _log2_ratio(x: np.ndarray, denom: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log2(x / denom)
    return np.where(np.isfinite(x) & (denom > 0), np.clip(r, -6, 6), np.nan)


def render(d: RunData, found: dict) -> str:
    s = found["summary"]
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>stepwatch report: {esc(d.run)}</title><style>{CSS}</style></head><body>",
        f"<h1>Anomaly report: run <code>{esc(d.run)}</code></h1>",
    ]
    # ---- summary
    parts.append('<h2 id="summary">Run summary</h2>')
    parts.append(_table([{"field": k, "value": v} for k, v in s.items()], ["field", "value"]))
    o = found["origin"]
    parts.append('<h2 id="origin">Where it started</h2>')
    parts.append(
        f"<p>{esc(o['explanation'])}.</p>" if o else '<p class="note">No anomaly events.</p>'
    )
    parts.append('<h2 id="incidents">Incidents</h2>')
    parts.append(
        '<p class="note">Events linked by site and time; each incident\'s origin is its '
        "earliest evidence. Headline first.</p>"
    )
    parts.append(
        _table(
            [
                {**i, "origin": f"{i['origin']['kind']} at {i['origin']['site']}"}
                | {"began": i["origin"]["onset_step"], "detected": i["origin"]["detected_step"]}
                for i in found["incidents"]
            ],
            [
                "id",
                "origin",
                "began",
                "detected",
                "cause",
                "severity",
                "clamped",
                "events",
                "kinds",
            ],
        )
    )

    # ---- loss and grad norm with event markers
    markers = [
        (e.step, SEVERITY_COLOR[e.severity], e.brief())
        for e in d.events
        if e.kind != EXPERT_REVIVAL
    ]
    parts.append('<h2 id="loss">Loss and gradient norm</h2><figure>')
    parts.append(
        line_chart(
            "train/loss (vertical lines: events; hover for details)",
            [("train/loss", d.steps, d.series("train/loss"))],
            markers=markers,
            y_label="nats",
        )
    )
    parts.append(
        line_chart(
            "grad/global_norm",
            [("grad/global_norm", d.steps, d.series("grad/global_norm"))],
            log_y=True,
            markers=markers,
        )
    )
    user = [n for n, stat in zip(d.index.names, d.index.stat) if stat == USER_STAT]
    if user:  # what the run logged with monitor.log (hooks/userlog.py tags it stat "user")
        parts.append(
            line_chart(
                "logged with monitor.log",
                [(n, d.steps, d.series(n)) for n in sorted(user)[:8]],
                markers=markers,
            )
        )
    parts.append("</figure>")

    # ---- heatmaps
    if d.index.moe_layers and d.steps.size:
        tok, labels, groups = _grids(d, "tokens")
        total = np.nansum(tok, axis=1, keepdims=True)
        n_e = np.isfinite(tok).sum(axis=1, keepdims=True)
        share = _log2_ratio(tok * n_e, total)
        rms, _, _ = _grids(d, "act_rms")
        rms = np.where(rms > 0, rms, np.nan)  # no tokens: no activation (grey)
        with np.errstate(all="ignore"):
            med = np.nanmedian(np.where(rms > 0, rms, np.nan), axis=1, keepdims=True)
        rel = _log2_ratio(rms, np.broadcast_to(med, rms.shape))
        rows = share.shape[0] * share.shape[1]
        parts.append('<h2 id="heatmaps">Experts over steps</h2><figure>')
        parts.append(
            heatmap(
                "token share (layer x expert, over steps)",
                share.reshape(rows, -1),
                labels,
                d.steps,
                lo=-4,
                hi=2,
                row_groups=groups,
                legend="log2(tokens / uniform share): blue = "
                "starved, white = fair share, red = overloaded, grey = none",
            )
        )
        parts.append(
            heatmap(
                "activation RMS relative to the layer median",
                rel.reshape(rows, -1),
                labels,
                d.steps,
                lo=-4,
                hi=4,
                row_groups=groups,
                legend="log2(act_rms / layer median): blue = "
                "silent (dying), red = large (blowing up), grey = no tokens",
            )
        )
        parts.append("</figure>")

    # ---- dead experts
    parts.append('<h2 id="dead">Dead experts</h2>')
    parts.append(
        _table(
            found["dead_experts"],
            ["site", "onset_step", "detected_step", "delay", "evidence", "revived_step"],
        )
    )

    # ---- blow-ups
    parts.append('<h2 id="blowups">Blow-ups, clip thresholds and their effect</h2>')
    parts.append(
        _table(
            found["blowups"],
            [
                "site",
                "kind",
                "rule",
                "onset_step",
                "detected_step",
                "value_at_detection",
                "decision",
                "reason",
                "clips",
                "effect",
            ],
        )
    )
    for b in found["blowups"]:
        x = d.series(f"{b['site']}/act_maxabs")
        marks = [
            (
                b["detected_step"],
                SEVERITY_COLOR["warning"],
                f"detected at step {b['detected_step']}",
            )
        ]
        hl = []
        for c in b["clips"]:
            if c["acked_step"] >= 0:
                marks.append(
                    (
                        c["acked_step"],
                        SEVERITY_COLOR["info"],
                        f"clip v{c['version']} L={c['limit']} in effect from step "
                        f"{c['acked_step']}",
                    )
                )
            if isinstance(c["bound_maxabs"], float) and math.isfinite(c["bound_maxabs"]):
                hl.append((c["bound_maxabs"], "#2e7d32", f"L^2 = {c['bound_maxabs']:.3g}"))
        parts.append(
            line_chart(
                f"{b['site']}/act_maxabs",
                [("max |h|", d.steps, x)],
                log_y=True,
                markers=marks,
                hlines=hl,
            )
        )

    # ---- all events and clip updates
    parts.append('<h2 id="events">Events</h2>')
    parts.append(
        _table(
            found["events"],
            [
                "step",
                "onset_step",
                "kind",
                "severity",
                "site",
                "value",
                "threshold",
                "confidence",
                "decision",
                "incident",
            ],
        )
    )
    parts.append('<h2 id="clips">Clip updates</h2>')
    parts.append(
        _table(
            found["clips"], ["version", "step", "layer", "site", "limit", "acked_step", "reason"]
        )
    )
    twin = json.dumps(found, sort_keys=True).replace("</", "<\\/")
    parts.append(f'<script type="application/json" id="findings">{twin}</script>')
    parts.append("</body></html>")
    return "\n".join(parts)
