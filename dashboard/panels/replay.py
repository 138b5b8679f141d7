"""Replay: the step slider with play/pause and speed, and the training curves up to that step.

The chosen step lives in st.session_state["step"] (the slider's key); every panel below reads
it, so the heatmaps and the event table stay in sync with the curves. Play advances it by
`speed` steps per tick; the body reruns itself once per tick while playing (next_tick). While
a run is live and the user sits at its last step, the step follows the new head; once they
scrub back it stays put.
"""

from __future__ import annotations

import time
from typing import Any

import polars as pl
import streamlit as st
from streamlit.errors import StreamlitAPIException

from dashboard import charts, data, reads

SPEEDS = (1, 2, 5, 10, 20, 50, 100, 500, 1000, 5000)
CURVES = (  # chart id, title, metric names (a trailing * takes every match, sorted)
    ("loss", "loss (main + MTP heads)", ("train/loss", "train/mtp_loss/*")),
    ("grad_norm", "gradient norm (global, before clipping)", ("grad/global_norm",)),
    ("lr", "learning rate", ("train/lr",)),
)
USER_STAT = "user"  # the stat of what the run logged with monitor.log (hooks/userlog.py)
USER_CURVES = 8  # at most this many of them in the replay chart


def step_range(url: str, run: str, row: dict[str, Any]) -> tuple[int, int] | None:
    """(first, last) step of the run, or None before its first step. The first step comes
    from the loss series (a resumed run need not start at 0)."""
    if row["last_step"] is None:
        return None
    loss = reads.series(url, run, "train/loss", reads.version_of(row))
    lo = int(loss["step"].min()) if loss.height else 0
    return min(lo, row["last_step"]), int(row["last_step"])


def _default_speed(lo: int, hi: int) -> int:
    """About 200 ticks for a whole replay."""
    want = max(1, (hi - lo) // 200)
    return max([s for s in SPEEDS if s <= want], default=1)


def _toggle_play(lo: int) -> None:
    ss = st.session_state
    ss.playing = not ss.get("playing", False)
    if ss.playing and ss.get("step", lo) >= ss.get("head", lo):  # at the end: start over
        ss.step = lo


def next_tick(started: float, tick_s: float) -> None:
    """Play's clock, kept on the server: sleep out the rest of this tick (the body's run began
    at `started`, time.monotonic), then rerun the body, so the next run advances the step. A
    click or a sidebar change that comes in meanwhile is folded into that rerun by Streamlit
    (Pause is seen by the run it starts). The body reruns alone when it runs as a fragment,
    with the whole script when it ran inside a full-app run (where Streamlit refuses a
    fragment-scoped rerun)."""
    time.sleep(max(0.0, tick_s - (time.monotonic() - started)))
    try:
        st.rerun(scope="fragment")
    except StreamlitAPIException:
        st.rerun()


def sync_step(run: str, lo: int, hi: int, live: bool) -> None:
    """Settle st.session_state.step for this rerun, before the slider exists: first view of a
    run starts at its last step, a live head is followed, play advances, bounds hold."""
    ss = st.session_state
    if "step" not in ss and "replay_step" in ss:  # widget state is dropped while the
        ss.step = ss.replay_step  # slider is not shown (other views)
    if ss.get("step_run") != run or "step" not in ss:
        ss.step_run, ss.step, ss.playing = run, hi, False
    elif live and ss.step == ss.get("head"):
        ss.step = hi  # following the live head
    elif ss.get("playing"):
        ss.step = ss.step + int(ss.get("speed", 1))
        if ss.step >= hi and not live:
            ss.playing = False  # the end of a finished run
    ss.step = ss.replay_step = min(max(int(ss.step), lo), hi)
    ss.head = hi


def controls(run: str, lo: int, hi: int, live: bool) -> int:
    """Slider, play/pause, speed; returns the chosen step."""
    sync_step(run, lo, hi, live)
    ss = st.session_state
    if "speed" not in ss or ss.get("speed_run") != run:
        ss.speed, ss.speed_run = _default_speed(lo, hi), run
    cols = st.columns([8, 1, 2], vertical_alignment="bottom")
    with cols[0]:
        if hi > lo:
            st.slider("step", lo, hi, key="step")
        else:
            st.caption(f"step {hi} (the only step so far)")
    cols[1].button(
        "⏸ Pause" if ss.get("playing") else "▶ Play",
        key="play",
        on_click=_toggle_play,
        args=(lo,),
        disabled=hi <= lo,
    )
    cols[2].selectbox("speed (steps per tick)", SPEEDS, key="speed")
    return int(ss.step)


def _names(dictionary: pl.DataFrame, wanted: tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for w in wanted:
        if w.endswith("*"):
            out += data.filter_metrics(dictionary, w)["name"].to_list()
        elif w in set(dictionary["name"].to_list()):
            out.append(w)
    return out


def curve_frames(
    url: str, run: str, names: list[str], version: reads.Version, lo: int, hi: int, step: int
) -> tuple[pl.DataFrame, list[data.Downsampled]]:
    """Each metric up to `step`, downsampled on the grid of the whole run [lo, hi] so the
    buckets stay put while the user scrubs (no wobble between neighbouring steps)."""
    width = data.bucket_width(lo, hi)
    parts, notes = [], []
    for name in names:
        s = reads.series(url, run, name, version).filter(pl.col("step") <= step)
        ds = data.downsample_minmax(s, lo=lo, width=width)
        notes.append(ds)
        parts.append(ds.frame.with_columns(series=pl.lit(name)))
    if not parts:
        return pl.DataFrame(
            schema={"step": pl.Int64, "value": pl.Float32, "series": pl.Utf8}
        ), notes
    return pl.concat(parts), notes


def curves(
    url: str, run: str, row: dict[str, Any], lo: int, hi: int, step: int, events: pl.DataFrame
) -> None:
    """Loss (+ MTP), grad norm and LR up to the replay step, event markers up to it too."""
    version = reads.version_of(row)
    dictionary = reads.metrics(url, run, version)
    shown = events.filter(pl.col("step") <= step)
    slots = [st.container(key="chart-loss")] + list(st.columns(2))
    user = dictionary.filter(pl.col("stat") == USER_STAT)["name"].to_list()
    panels = [(chart_id, title, _names(dictionary, wanted)) for chart_id, title, wanted in CURVES]
    if user:  # the user's own scalars, when the run logged any
        slots.append(st.container(key="chart-user"))
        more = f" (first {USER_CURVES} of {len(user)})" if len(user) > USER_CURVES else ""
        panels.append(("user", f"logged with monitor.log{more}", sorted(user)[:USER_CURVES]))
    for slot, (chart_id, title, names) in zip(slots, panels):
        with slot:
            if not names:
                st.caption(f"{title}: not recorded in this run")
                continue
            long, notes = curve_frames(url, run, names, version, lo, hi, step)
            st.altair_chart(
                charts.line_chart(
                    long,
                    chart_id=chart_id,
                    title=title,
                    step_now=step,
                    events=shown,
                    x_domain=(lo, hi),
                    run=run,
                ),
                width="stretch",
            )
            dropped = [n for n in notes if n.downsampled]
            if dropped:
                st.caption(dropped[0].caption())
