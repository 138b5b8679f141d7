"""stepwatch dashboard: the Streamlit script (`python -m dashboard --store URL` serves it).

Reads top to bottom: store URL, sidebar (runs, view), then the page body as one fragment that
re-runs by itself while a selected run is live (the fragment's timer) or replay is playing (the
body reruns itself, replay.next_tick) - the sidebar, the user's run selection and every widget's
state stay as they are; only the body redraws.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import polars as pl
import streamlit as st

from dashboard import auth, reads
from dashboard.panels import compare, events, explorer, heatmaps, replay
from dashboard.panels import runs as runs_panel
from store import StoreError

LIVE_REFRESH_S = 2.0  # body refresh while a selected run is live
PLAY_TICK_S = 0.5  # one replay step (of `speed` steps) per tick while playing
VIEWS = ("Replay", "Compare", "Explorer")


# ---------------------------------------------------------------- store URL
def store_url() -> str:
    """--store URL after the script's `--`, else $STEPWATCH_STORE."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--store")
    args, _ = parser.parse_known_args(sys.argv[1:])
    return args.store or os.environ.get("STEPWATCH_STORE", "")


st.set_page_config(page_title="stepwatch", page_icon="📈", layout="wide")
auth.gate()  # a password or an auth proxy, when configured (dashboard/auth.py)
URL = store_url()
if not URL:
    st.error(
        "no store given: run `python -m dashboard --store URL` "
        "(parquet:DIR or clickhouse://...) or set STEPWATCH_STORE"
    )
    st.stop()

# ---------------------------------------------------------------- sidebar
ss = st.session_state
try:
    all_runs = reads.runs(URL)
except StoreError as e:
    st.error(f"cannot read the store {reads.display_url(URL)}: {e}")
    st.stop()
rows = {r["run"]: r for r in all_runs.iter_rows(named=True)}
with st.sidebar:
    st.title("stepwatch")
    st.caption(f"store: `{reads.display_url(URL)}`")
    names = list(reversed(list(rows)))  # newest first
    if "runs" not in ss:  # ?run=a&run=b links pick runs
        ss.runs = [r for r in st.query_params.get_all("run") if r in rows] or names[:1]
    ss.runs = [r for r in ss.runs if r in rows]
    st.multiselect("runs", names, key="runs", format_func=lambda r: runs_panel.label(rows[r]))
    st.radio("view", VIEWS, key="view")
    st.button("↻ refresh runs list", key="refresh")
    selected: list[str] = list(ss.runs)
    if ss.view == "Replay" and len(selected) > 1:
        if ss.get("replay_run") not in selected:
            ss.replay_run = selected[0]
        st.selectbox("replay run", selected, key="replay_run")


def wanted_interval() -> float | None:
    """How often the fragment timer should refresh the body now: while a selected run is live.
    Play does not use the timer: re-arming it took a full rerun, and under Streamlit 1.67 a
    replay started that way sometimes stopped ticking (button Pause, step still) or ended with
    the slider drawn a step behind the heatmap."""
    try:
        runs = reads.runs(URL)
    except StoreError:  # shown by the body; keep refreshing to recover
        return LIVE_REFRESH_S
    live = runs.filter(pl.col("run").is_in(selected), pl.col("status") == "live")
    return LIVE_REFRESH_S if live.height else None


# ---------------------------------------------------------------- body
def replay_view(run: str) -> None:
    row = reads.run_row(URL, run)
    if row is None:
        st.warning(f"run {run!r} is no longer in the store")
        return
    runs_panel.header(row)
    bounds = replay.step_range(URL, run, row)
    if bounds is None:
        st.info("this run has not recorded a step yet")
        return
    lo, hi = bounds
    step = replay.controls(run, lo, hi, live=row["status"] == "live")
    evs = reads.events(URL, run, reads.version_of(row))
    runs_panel.holes(evs)  # steps a client dropped (and reported): missing on purpose
    replay.curves(URL, run, row, lo, hi, step, evs)
    heatmaps.heatmaps(URL, run, row, lo, step, evs)
    left, right = st.columns(2)
    with left:
        events.events_table(evs, lo, hi)
    with right:
        events.clip_panel(reads.clips(URL, run, reads.version_of(row)), step, lo, hi)


def body() -> None:
    started = time.monotonic()
    try:
        runs_panel.runs_list(reads.runs(URL))
        if not selected:
            st.info("pick a run in the sidebar")
        elif ss.view == "Replay":
            replay_view(ss.get("replay_run") if len(selected) > 1 else selected[0])
        elif ss.view == "Compare":
            compare.compare(URL, selected)
        else:
            run = selected[0]
            row = reads.run_row(URL, run)
            if row is not None:
                explorer.explorer(URL, run, row, ss.get("replay_step"))
    except StoreError as e:
        st.error(f"store error: {e}")
    if wanted_interval() != RUN_EVERY:  # live started or ended: re-arm the timer
        st.rerun()
    if ss.get("playing") and ss.get("view") == "Replay":
        replay.next_tick(started, PLAY_TICK_S)


RUN_EVERY = wanted_interval()
st.fragment(body, run_every=RUN_EVERY)()
