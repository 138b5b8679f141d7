"""Altair (Vega-Lite) chart builders: pure functions from frames to charts, no Streamlit.

Every chart carries `usermeta={"stepwatch": {"chart": ID, ...}}` in its spec, so tests (and
anyone reading the page's Vega specs) can tell which chart is which and at which step it was
drawn without scraping pixels.
"""

from __future__ import annotations

import altair as alt
import polars as pl

SEVERITY_COLORS = {"critical": "#b00020", "warning": "#e08000", "info": "#1f77b4"}
DEAD_COLOR = "#d62728"
STARVED_COLOR = "#ff9f1c"
NO_DATA_COLOR = "#e6e6e6"
CURVE_HEIGHT = 300  # the whole chart (title, axes, legend): Streamlit autosizes to fit
HEATMAP_CELL_PX = 24
FEW_POINTS = 60  # per series: below this each point is drawn too (one step shows)


def _meta(chart_id: str, **extra) -> dict:
    return {"stepwatch": {"chart": chart_id, **extra}}


def _event_rules(events: pl.DataFrame) -> alt.Chart:
    """Vertical rules at event steps, colored by severity."""
    sev = list(SEVERITY_COLORS)
    return (
        alt.Chart(events.select("step", "kind", "site", "severity", "value"))
        .mark_rule(strokeWidth=1.5, opacity=0.8)
        .encode(
            x="step:Q",
            color=alt.Color(
                "severity:N",
                scale=alt.Scale(domain=sev, range=[SEVERITY_COLORS[s] for s in sev]),
                legend=alt.Legend(title="event"),
            ),
            tooltip=["step:Q", "kind:N", "site:N", "severity:N", "value:Q"],
        )
    )


def line_chart(
    long: pl.DataFrame,
    *,
    chart_id: str,
    title: str,
    color: str = "series",
    step_now: int | None = None,
    events: pl.DataFrame | None = None,
    x_domain: tuple[int, int] | None = None,
    log_y: bool = False,
    legend: str = "top",
    **meta,
) -> alt.LayerChart:
    """Lines of `long` (step, value, <color>) with an optional rule at the replay step and
    event rules. x_domain pins the axis (replay keeps the whole run's range while scrubbing)."""
    x_scale = alt.Scale(domain=list(x_domain), nice=False) if x_domain else alt.Scale(nice=False)
    few = long.height <= FEW_POINTS * max(long[color].n_unique(), 1)
    y_scale = alt.Scale(type="log") if log_y else alt.Scale(zero=False)
    base = (
        alt.Chart(long.select("step", "value", color))
        .mark_line(clip=True, point=few)
        .encode(
            x=alt.X(
                "step:Q", title="step", scale=x_scale, axis=alt.Axis(format="d", tickMinStep=1)
            ),
            y=alt.Y("value:Q", title=None, scale=y_scale),
            color=alt.Color(
                f"{color}:N", legend=alt.Legend(title=None, orient=legend, labelLimit=320)
            ),
            tooltip=[f"{color}:N", "step:Q", alt.Tooltip("value:Q", format=".5g")],
        )
    )
    layers: list[alt.Chart] = [base]
    if events is not None and events.height:
        layers.append(_event_rules(events))
    if step_now is not None:
        layers.append(
            alt.Chart(pl.DataFrame({"step": [step_now]}))
            .mark_rule(color="#555", strokeDash=[4, 3])
            .encode(x="step:Q")
        )
    chart = alt.layer(*layers).resolve_scale(color="independent")
    return chart.properties(
        title=title, height=CURVE_HEIGHT, usermeta=_meta(chart_id, step=step_now, **meta)
    )


def heatmap_chart(
    cells: pl.DataFrame,
    *,
    chart_id: str,
    title: str,
    value_title: str,
    step: int | None = None,
    window: tuple[int, int] | None = None,
) -> alt.LayerChart:
    """Layer (rows) x expert (columns) cells colored by `value` (experts.CELL_COLUMNS):
    detector-declared dead experts outlined red and crossed, starved ones outlined orange;
    cells without data (e.g. no tokens for a ratio) drawn grey."""
    df = cells.select(
        "layer",
        "expert",
        "value",
        "share",
        "tokens",
        "starved",
        "dead",
        outline=pl.when(pl.col("dead"))
        .then(pl.lit(DEAD_COLOR))
        .when(pl.col("starved"))
        .then(pl.lit(STARVED_COLOR))
        .otherwise(None),
    )
    enc = dict(
        x=alt.X("expert:O", title="expert"), y=alt.Y("layer:O", title="layer", sort="descending")
    )
    rect = (
        alt.Chart(df)
        .mark_rect()
        .encode(
            **enc,
            color=alt.condition(
                "isValid(datum.value)",
                alt.Color("value:Q", title=value_title, scale=alt.Scale(scheme="viridis")),
                alt.value(NO_DATA_COLOR),
            ),
            stroke=alt.Stroke("outline:N", scale=None),  # the colors themselves
            strokeWidth=alt.condition("isValid(datum.outline)", alt.value(2.5), alt.value(0)),
            tooltip=[
                "layer:O",
                "expert:O",
                alt.Tooltip("value:Q", format=".4g"),
                alt.Tooltip("share:Q", format=".3f"),
                "tokens:Q",
                "starved:N",
                "dead:N",
            ],
        )
    )
    cross = (
        alt.Chart(df.filter(pl.col("dead")))
        .mark_text(text="✕", color=DEAD_COLOR, fontSize=13, fontWeight="bold")
        .encode(**enc)
    )
    return alt.layer(rect, cross).properties(
        title=title,
        width=alt.Step(HEATMAP_CELL_PX),
        height=alt.Step(HEATMAP_CELL_PX),
        usermeta=_meta(chart_id, step=step, window=list(window) if window else None),
    )


def clip_chart(
    segments: pl.DataFrame, *, step_now: int | None, x_domain: tuple[int, int] | None
) -> alt.LayerChart:
    """Clip limit L per site as horizontal segments (data.clip_segments): a limit holds from
    the step it took effect until the next update; gaps are periods with the clip off."""
    x_scale = alt.Scale(domain=list(x_domain), nice=False) if x_domain else alt.Undefined
    lines = (
        alt.Chart(segments)
        .mark_line(point=True, strokeWidth=2.5)
        .encode(
            x=alt.X("step:Q", title="step", scale=x_scale, axis=alt.Axis(format="d")),
            y=alt.Y(
                "limit:Q", title="L", scale=alt.Scale(zero=False), axis=alt.Axis(format=".3~g")
            ),
            color=alt.Color("site:N", legend=alt.Legend(title=None, orient="top")),
            detail="segment:N",
            tooltip=["site:N", "step:Q", "limit:Q"],
        )
    )
    layers = [lines]
    if step_now is not None:
        layers.append(
            alt.Chart(pl.DataFrame({"step": [step_now]}))
            .mark_rule(color="#555", strokeDash=[4, 3])
            .encode(x="step:Q")
        )
    return alt.layer(*layers).properties(
        title="clip thresholds (L) per site",
        height=CURVE_HEIGHT,
        usermeta=_meta("clips", step=step_now),
    )
