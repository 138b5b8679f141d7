"""Incidents (events linked by site and time, each with its origin), detector events (with a
jump of the replay to an event's step) and clip thresholds per site.

Both tables come from the store's optional `events(run)` / `clips(run)` reads; a store without
them, or a run without rows, shows "no events recorded" / "no clip updates recorded".
"""

from __future__ import annotations

import polars as pl
import streamlit as st

from dashboard import charts, data

EVENT_TABLE_COLUMNS = (
    "step",
    "severity",
    "kind",
    "site",
    "value",
    "threshold",
    "onset_step",
    "decision",
    "incident",
)


def event_label(row: dict) -> str:
    severity, site = row["severity"] or "?", row["site"] or "—"
    return f"step {row['step']} · {severity} · {row['kind']} · {site}"


def _jump(events: pl.DataFrame, lo: int, hi: int) -> None:
    """on_click of "Jump": runs before the rerun, so the slider is created at the new step."""
    ss = st.session_state
    pick = ss.get("event_pick")
    if pick is None or not 0 <= pick < events.height:
        return
    ss.step = ss.replay_step = min(max(int(events["step"][pick]), lo), hi)
    ss.playing = False


INCIDENTS_SPELLED_OUT = 5  # the rest are rows of the table only


def incidents_table(events: pl.DataFrame) -> None:
    """Headline first: where it started, for every incident of the run. The first few are
    spelled out in words (the table below is terse, and a grid is not searchable text)."""
    inc = data.incidents(events)
    if inc.height == 0:
        return
    st.subheader("Incidents")
    told = inc["explanation"].to_list()
    st.caption(told[0])
    for text in told[1:INCIDENTS_SPELLED_OUT]:
        st.caption(f"also {text}")
    if len(told) > INCIDENTS_SPELLED_OUT:
        st.caption(f"and {len(told) - INCIDENTS_SPELLED_OUT} more incident(s) in the table")
    st.dataframe(
        inc.drop("explanation"),
        hide_index=True,
        key="incidents_table",
        height=min(300, 38 + 35 * inc.height),
    )


def events_table(events: pl.DataFrame, lo: int, hi: int) -> None:
    incidents_table(events)
    st.subheader("Events")
    if events.height == 0:
        st.info("no events recorded")
        return
    st.dataframe(
        events.select(EVENT_TABLE_COLUMNS),
        hide_index=True,
        key="events_table",
        height=min(400, 38 + 35 * events.height),
    )
    cols = st.columns([3, 1], vertical_alignment="bottom")
    labels = [event_label(r) for r in events.iter_rows(named=True)]
    cols[0].selectbox(
        "event", range(events.height), format_func=labels.__getitem__, key="event_pick"
    )
    cols[1].button("Jump to step", key="event_jump", on_click=_jump, args=(events, lo, hi))


def clip_panel(timeline: pl.DataFrame, step: int, lo: int, hi: int) -> None:
    st.subheader("Clip thresholds")
    if timeline.height == 0:
        st.info("no clip updates recorded")
        return
    shown = timeline.filter(pl.col("step") <= step)
    if shown.height == 0:
        st.caption(
            f"no clip in effect yet at step {step} "
            f"(first update at step {int(timeline['step'].min())})"
        )
        return
    st.altair_chart(
        charts.clip_chart(data.clip_segments(shown, step), step_now=step, x_domain=(lo, hi)),
        width="stretch",
    )
    now = (
        shown.group_by("site", maintain_order=True)
        .agg(
            pl.col("limit").last(),
            pl.col("step").last().alias("since step"),
            pl.col("acked").last(),
            pl.col("reason").last(),
        )
        .with_columns(pl.col("limit").round(4).cast(pl.Utf8).fill_null("off"))
        .sort("site")
    )
    st.dataframe(now, hide_index=True, key="clips_now")
