"""Pure data shaping for the dashboard's curves and tables: no Streamlit, no store.

Unit-tested without a browser: min/max downsampling (a spike is never averaged away), run
alignment for comparisons, metric search by glob and labels, and the normalization of the
event and clip-update tables. Heatmap cells live in experts.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import polars as pl

from store.globs import glob_to_regex

MAX_POINTS = 2000  # points per drawn series: two per bucket, ~one per screen pixel
EVENT_COLUMNS = {
    "step": pl.Int64,
    "kind": pl.Utf8,
    "site": pl.Utf8,
    "severity": pl.Utf8,
    "value": pl.Float64,
    "threshold": pl.Float64,
    "onset_step": pl.Int64,
    "detail": pl.Utf8,
    "decision": pl.Utf8,  # from detail: what the decision layer made of the event
    "incident": pl.Int64,  # from detail: the incident it belongs to (-1: none recorded)
}
CLIP_COLUMNS = {
    "version": pl.Int64,
    "step": pl.Int64,
    "layer": pl.Int32,
    "site": pl.Utf8,
    "limit": pl.Float32,
    "reason": pl.Utf8,
    "acked_step": pl.Int64,
}


# ---- downsampling ------------------------------------------------------------------------
@dataclass(frozen=True)
class Downsampled:
    frame: pl.DataFrame  # the rows to draw, sorted by step, a subset of the input rows
    n_in: int  # rows before downsampling
    width: int  # steps per bucket; 1 = nothing was dropped

    @property
    def downsampled(self) -> bool:
        return self.width > 1

    def caption(self) -> str:
        if not self.downsampled:
            return f"{self.n_in:,} points (all shown)"
        return (
            f"downsampled for display: {self.n_in:,} points → {self.frame.height:,} "
            f"(min and max of every {self.width:,} steps, so spikes stay visible)"
        )


def bucket_width(lo: int, hi: int, max_points: int = MAX_POINTS) -> int:
    """Steps per bucket so that [lo, hi] fits in max_points // 2 buckets (two points each)."""
    buckets = max(1, max_points // 2)
    return max(1, -(-(hi - lo + 1) // buckets))  # ceil division


def downsample_minmax(
    df: pl.DataFrame,
    max_points: int = MAX_POINTS,
    *,
    x: str = "step",
    y: str = "value",
    lo: int | None = None,
    width: int | None = None,
) -> Downsampled:
    """Keep, per bucket of `width` steps starting at `lo`, the row with the minimum and the row
    with the maximum `y` (an inf is a maximum); NaN rows are always kept, since a non-finite
    value is the most important point of a curve. Passing the same lo/width for several series
    puts their buckets on one grid (compare mode). Other columns ride along."""
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    df = df.sort(x)
    n = df.height
    if n == 0:
        return Downsampled(df, 0, 1)
    if n <= max_points:
        return Downsampled(df, n, 1)
    lo = int(df[x][0]) if lo is None else lo
    width = bucket_width(lo, int(df[x][-1]), max_points) if width is None else width
    idx = df.with_row_index("_i")
    nan = pl.col(y).is_nan()
    picks = (
        idx.filter(~nan)
        .group_by((pl.col(x) - lo) // width)
        .agg(
            pl.col("_i").get(pl.col(y).arg_min()).alias("a"),
            pl.col("_i").get(pl.col(y).arg_max()).alias("b"),
        )
    )
    keep = pl.concat([picks["a"], picks["b"], idx.filter(nan)["_i"]]).unique()
    out = idx.filter(pl.col("_i").is_in(keep.implode())).drop("_i")
    return Downsampled(out, n, width)


# ---- several runs, metric search -----------------------------------------------------------
def align_runs(
    series: dict[str, pl.DataFrame], max_points: int = MAX_POINTS
) -> tuple[pl.DataFrame, list[Downsampled]]:
    """Long frame (run, step, value) of several runs on one step axis, each run downsampled on
    a shared bucket grid so that bucket k means the same steps for every run."""
    frames = {r: df for r, df in series.items() if df.height}
    if not frames:
        return pl.DataFrame(schema={"run": pl.Utf8, "step": pl.Int64, "value": pl.Float32}), []
    lo = min(int(df["step"].min()) for df in frames.values())
    hi = max(int(df["step"].max()) for df in frames.values())
    width = bucket_width(lo, hi, max_points)
    parts, notes = [], []
    for run, df in frames.items():
        ds = downsample_minmax(df, max_points, lo=lo, width=width)
        notes.append(ds)
        parts.append(ds.frame.select(pl.lit(run).alias("run"), "step", "value"))
    return pl.concat(parts), notes


def filter_metrics(
    dictionary: pl.DataFrame, pattern: str, *, layers=(), experts=(), heads=(), stats=()
) -> pl.DataFrame:
    """Dictionary rows whose name matches the glob `pattern` (the store's glob semantics) and
    whose labels are in the given sets (an empty set does not filter). Never builds a query."""
    df = dictionary.filter(pl.col("name").str.contains(glob_to_regex(pattern or "*")))
    for col, allowed in (("layer", layers), ("expert", experts), ("head", heads), ("stat", stats)):
        if allowed:
            df = df.filter(pl.col(col).is_in(list(allowed)))
    return df.sort("name")


# ---- optional tables (events, clip updates) --------------------------------------------------
def _conform(df: pl.DataFrame | None, schema: dict) -> pl.DataFrame:
    """Any frame (or None) -> exactly `schema`'s columns; missing ones become nulls."""
    if df is None or df.height == 0:
        return pl.DataFrame(schema=schema)
    return df.select(
        [
            pl.col(c).cast(t, strict=False) if c in df.columns else pl.lit(None, dtype=t).alias(c)
            for c, t in schema.items()
        ]
    )


def normalize_events(df: pl.DataFrame | None) -> pl.DataFrame:
    """Stored events, with what the decision layer made of each (decision, incident: from the
    event's detail; "" / -1 for events stored before it existed)."""
    df = _conform(df, EVENT_COLUMNS).sort("step", "kind", "site", nulls_last=True)
    decoded = [_detail(d) for d in df["detail"].to_list()]
    return df.with_columns(
        decision=pl.Series([str(d.get("decision", "")) for d in decoded], dtype=pl.Utf8),
        incident=pl.Series([int(d.get("incident", -1)) for d in decoded], dtype=pl.Int64),
    )


def _detail(text: str | None) -> dict:
    try:
        d = json.loads(text or "{}")
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}


INCIDENT_COLUMNS = {
    "incident": pl.Int64,
    "origin": pl.Utf8,
    "began": pl.Int64,
    "detected": pl.Int64,
    "cause": pl.Utf8,
    "severity": pl.Utf8,
    "clamped": pl.Boolean,
    "events": pl.Int64,
    "explanation": pl.Utf8,
}


def incidents(events: pl.DataFrame) -> pl.DataFrame:
    """normalize_events rows -> one row per incident (analytics.incidents.summarize: events
    linked by site and time, each with its origin), headline first; ends and recoveries are
    not anomalies and are left out."""
    from analytics.events import from_frame
    from analytics.incidents import summarize

    anomalies = events.filter(pl.col("severity") != "info")
    if anomalies.height == 0:
        return pl.DataFrame(schema=INCIDENT_COLUMNS)
    rows = []
    for inc in summarize(from_frame(anomalies, "run")):
        o = inc.origin
        rows.append(
            {
                "incident": inc.id,
                "origin": f"{o.kind} at {o.site}",
                "began": o.onset_step,
                "detected": o.step,
                "cause": inc.cause,
                "severity": inc.severity,
                "clamped": inc.clamped,
                "events": len(inc.events),
                "explanation": inc.explanation(),
            }
        )
    return pl.DataFrame(rows, schema=INCIDENT_COLUMNS)


def clip_timeline(df: pl.DataFrame | None) -> pl.DataFrame:
    """Clip updates -> one row per (layer/site, update) at the step it took effect (acked_step
    once acknowledged, else the step it was decided), with `acked`. A limit of inf or <= 0
    means "off" (the proto's convention): limit becomes null, so the drawn line has a gap."""
    df = _conform(df, CLIP_COLUMNS)
    acked = pl.col("acked_step") >= 0
    on = pl.col("limit").is_finite() & (pl.col("limit") > 0)
    return (
        df.with_columns(
            site=pl.format(
                "layer{}/{}", pl.col("layer").cast(pl.Utf8).str.zfill(2), pl.col("site")
            ),
            step=pl.when(acked).then(pl.col("acked_step")).otherwise(pl.col("step")),
            limit=pl.when(on).then(pl.col("limit")).otherwise(None),
            acked=acked.fill_null(False),
        )
        .select("site", "step", "limit", "acked", "version", "reason")
        .sort("site", "step", "version")
    )


def clip_segments(timeline: pl.DataFrame, until: int) -> pl.DataFrame:
    """clip_timeline rows -> one horizontal segment per limit, from the step it took effect to
    the site's next update (or `until`, the replay step): columns site, segment, step, limit,
    two rows per segment. Periods with the clip off draw nothing; updates after `until` are
    not shown yet. Clip updates are rare, so a plain loop is fine here."""
    rows: list[tuple[str, str, int, float]] = []
    for (site,), g in timeline.sort("site", "step", "version").group_by(
        "site", maintain_order=True
    ):
        steps, limits = g["step"].to_list(), g["limit"].to_list()
        for i, (step, limit) in enumerate(zip(steps, limits)):
            if step > until:
                break
            end = min(steps[i + 1], until) if i + 1 < len(steps) else until
            if limit is not None and end >= step:
                rows += [(site, f"{site}#{i}", step, limit), (site, f"{site}#{i}", end, limit)]
    return pl.DataFrame(
        rows,
        schema={"site": pl.Utf8, "segment": pl.Utf8, "step": pl.Int64, "limit": pl.Float32},
        orient="row",
    )
