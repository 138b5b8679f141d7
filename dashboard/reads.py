"""Every store read the dashboard makes, cached per (store URL, run, arguments).

One Store per URL per server process (st.cache_resource; the backends are safe to share across
sessions: ClickHouse serializes its connection, Parquet re-lists files on every read). Results
go through st.cache_data, keyed by the URL, the run, the arguments and the run's *version*
(last_step, updated_at, status from the runs table): a live run that moves on gets fresh reads at
once, a finished run is read once per TTL however often the page reruns. The runs table itself
is the only read with no version, so it carries the shortest TTL.

Reads of a step behind the run's head are final (a step's reduced rows are committed together;
late ranks only add raw rows), so they are keyed without the version and survive live refreshes:
replaying a live run re-reads one heatmap step per step moved, not the whole window per flush.

The app builds no queries: names and globs go to the store's read API as arguments.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import streamlit as st

from dashboard import data, experts
from store import NotFound, Store, open_store

RUNS_TTL_S = 2.0  # how stale the runs list (status, last step) may be in live mode
DATA_TTL_S = 60.0  # everything else is keyed by the run's version as well
MAX_ENTRIES = 512  # per cached function: bounds the server's memory
FINAL = "final"  # version key of reads that can no longer change
COLUMN_BUDGET = 128  # expert metrics a finished run may have and still be read whole

Version = tuple[Any, ...]


def display_url(url: str) -> str:
    """The URL without a password (clickhouse://user:pass@host -> clickhouse://user@host)."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        cred, _, host = rest.rpartition("@")
        return f"{scheme}://{cred.split(':', 1)[0]}@{host}"
    return url


@st.cache_resource(show_spinner=False)
def store(url: str) -> Store:
    """The shared Store for `url` (opened once per server process)."""
    return open_store(url)


@st.cache_data(ttl=RUNS_TTL_S, max_entries=64, show_spinner=False)
def runs(url: str) -> pl.DataFrame:
    return store(url).runs()


def run_row(url: str, run: str) -> dict[str, Any] | None:
    hit = runs(url).filter(pl.col("run") == run)
    return hit.row(0, named=True) if hit.height else None


def version_of(row: dict[str, Any] | None) -> Version:
    """What changes whenever the run's data may have changed."""
    if row is None:
        return ("missing",)
    return (row["last_step"], row["updated_at"], row["status"])


@st.cache_data(ttl=DATA_TTL_S, max_entries=MAX_ENTRIES, show_spinner=False)
def metrics(url: str, run: str, version: Version) -> pl.DataFrame:
    return store(url).metrics(run)


@st.cache_data(ttl=DATA_TTL_S, max_entries=MAX_ENTRIES, show_spinner=False)
def series(
    url: str,
    run: str,
    metric: str,
    version: Version,
    start: int | None = None,
    stop: int | None = None,
) -> pl.DataFrame:
    """One metric's reduced values; an empty frame when the run lacks the metric."""
    try:
        return store(url).series(run, metric, start=start, stop=stop)
    except NotFound:
        return pl.DataFrame(schema={"step": pl.Int64, "value": pl.Float32})


@st.cache_data(ttl=DATA_TTL_S, max_entries=MAX_ENTRIES, show_spinner=False)
def _at_step(url: str, run: str, step: int, pattern: str, version: Version) -> pl.DataFrame:
    return store(url).at_step(run, step, pattern)


def at_step(
    url: str, run: str, step: int, pattern: str, row: dict[str, Any] | None
) -> pl.DataFrame:
    """Metrics matching the glob at one step; final (version-free key) behind the head."""
    last = None if row is None else row["last_step"]
    final = last is not None and step < last
    return _at_step(url, run, int(step), pattern, (FINAL,) if final else version_of(row))


def expert_wide(
    url: str, run: str, lo: int, hi: int, stats: tuple[str, ...], row: dict[str, Any] | None
) -> pl.DataFrame:
    """Per-(step, layer, expert) columns of `stats` for steps lo..hi inclusive.

    A finished run with at most COLUMN_BUDGET such metrics is read as whole series once
    (cached), so replaying it afterwards slices memory: no store read per step. Otherwise
    (live runs, or models too wide for that) one cached at_step per step: sliding the window
    by one step costs one read."""
    version = version_of(row)
    if row is not None and row["status"] == "finished":
        names = expert_metric_names(url, run, stats, version)
        if 0 < len(names) <= COLUMN_BUDGET:
            wide = _expert_columns(url, run, tuple(names), version)
            return wide.filter(pl.col("step").is_between(lo, hi))
    frames = [
        at_step(url, run, s, experts.HEATMAP_PATTERN, row)
        .filter(pl.col("stat").is_in(list(stats)))
        .with_columns(step=pl.lit(s, pl.Int64))
        for s in range(lo, hi + 1)
    ]
    return experts.expert_stats(pl.concat(frames) if frames else pl.DataFrame())


def expert_metric_names(url: str, run: str, stats: tuple[str, ...], version: Version) -> list[str]:
    d = metrics(url, run, version)
    return d.filter(
        pl.col("name").str.starts_with(experts.EXPERT_PREFIX),
        pl.col("expert") >= 0,
        pl.col("layer") >= 0,
        pl.col("stat").is_in(list(stats)),
    )["name"].to_list()


@st.cache_data(ttl=DATA_TTL_S, max_entries=16, show_spinner=False)
def _expert_columns(url: str, run: str, names: tuple[str, ...], version: Version) -> pl.DataFrame:
    labels = metrics(url, run, version).filter(pl.col("name").is_in(list(names)))
    parts = []
    for r in labels.iter_rows(named=True):
        s = series(url, run, r["name"], version)  # per-metric cache: shared by views
        parts.append(
            s.with_columns(
                name=pl.lit(r["name"]),
                layer=pl.lit(r["layer"], pl.Int32),
                expert=pl.lit(r["expert"], pl.Int32),
                stat=pl.lit(r["stat"]),
            )
        )
    return experts.expert_stats(pl.concat(parts))


def _optional(url: str, method: str, run: str) -> pl.DataFrame | None:
    """Call a read the store may not have yet (events, clips arrive with the detectors)."""
    fn = getattr(store(url), method, None)
    if fn is None:
        return None
    try:
        return fn(run)
    except (NotImplementedError, NotFound):
        return None


@st.cache_data(ttl=DATA_TTL_S, max_entries=MAX_ENTRIES, show_spinner=False)
def events(url: str, run: str, version: Version) -> pl.DataFrame:
    """Detector events (data.EVENT_COLUMNS), empty when the store records none."""
    return data.normalize_events(_optional(url, "events", run))


@st.cache_data(ttl=DATA_TTL_S, max_entries=MAX_ENTRIES, show_spinner=False)
def clips(url: str, run: str, version: Version) -> pl.DataFrame:
    """Clip-threshold timeline (site, step, limit, version, reason), empty when none."""
    return data.clip_timeline(_optional(url, "clips", run))
