"""The runs list (status, start, steps, world size) and the live header of the replayed run."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import polars as pl
import streamlit as st

from store.base import HOLE_EVENT_KIND


def age_text(seconds: float) -> str:
    """'4 s', '3 min', '2.5 h' - how long ago, for humans."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def label(row: dict[str, Any]) -> str:
    """How a run appears in the sidebar picker: 'name (live)'. Nothing that changes every
    step: the sidebar is redrawn only on full reruns, the page body shows live numbers."""
    return f"{row['run']} ({row['status']})"


def table(runs: pl.DataFrame, now: float | None = None) -> pl.DataFrame:
    """The runs frame as shown: one row per run, newest first."""
    now = time.time() if now is None else now
    return runs.sort("started_at", descending=True).select(
        "run",
        "status",
        pl.from_epoch(pl.col("started_at"), time_unit="s")
        .dt.replace_time_zone("UTC")
        .dt.strftime("%Y-%m-%d %H:%M:%S UTC")
        .alias("started"),
        (pl.col("last_step") + 1).alias("steps"),
        pl.col("world_size").alias("world size"),
        (now - pl.col("updated_at"))
        .map_elements(age_text, return_dtype=pl.Utf8)
        .alias("last update"),
    )


def runs_list(runs: pl.DataFrame) -> None:
    with st.expander(f"Runs in this store ({runs.height})", expanded=False):
        if runs.height == 0:
            st.info("no runs recorded yet")
            return
        st.dataframe(table(runs), hide_index=True, key="runs_table")


def hole_lines(events: pl.DataFrame) -> list[str]:
    """Telemetry holes (steps a rank's client dropped and reported), one line per rank."""
    holes = events.filter(pl.col("kind") == HOLE_EVENT_KIND)
    lines = []
    for (site,), g in holes.sort("site", "step").group_by("site", maintain_order=True):
        spans = [
            f"{a}" if a == b else f"{a}-{b}"
            for a, b in zip(g["onset_step"].to_list(), g["step"].to_list())
        ]
        n = int(g["value"].sum())
        more = f" and {len(spans) - 8} more ranges" if len(spans) > 8 else ""
        lines.append(
            f"{site.rsplit('/', 1)[-1]}: {n} step(s) never sent ({', '.join(spans[:8])}{more})"
        )
    return lines


def holes(events: pl.DataFrame) -> None:
    """A warning naming the holes, if any: those steps are missing on purpose, not lost."""
    lines = hole_lines(events)
    if lines:
        st.warning(
            "Telemetry holes - the client's buffer was full while the collector was away:\n\n"
            + "\n\n".join(f"- {line}" for line in lines),
            icon="⚠️",
        )


def header(row: dict[str, Any]) -> None:
    """Run name, status, and for a live run how long ago its last step arrived."""
    started = datetime.fromtimestamp(row["started_at"], UTC).strftime("%Y-%m-%d %H:%M UTC")
    last = "no step yet" if row["last_step"] is None else f"last step {row['last_step']:,}"
    parts = [f"**{row['status']}**", last, f"world size {row['world_size']}", f"started {started}"]
    if row["status"] == "live":
        age = age_text(time.time() - row["updated_at"])
        parts.insert(2, f"last step received **{age} ago**")
    with st.container(key="run-header"):
        st.subheader(row["run"])
        st.markdown(" · ".join(parts))
