"""Layer x expert heatmaps at the replay step and over a window of steps ending there.

Views (experts.VIEWS): token share of the layer's routed tokens; SwiGLU activation RMS; each
expert's output norm over the layer median of experts that got tokens ("max-to-median": a row's
maximum is the layer's max-to-median ratio, Step 3.5 Flash Fig. 4). Experts the detector has
declared dead are crossed out in red; starved ones (below its thresholds) outlined in orange.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import polars as pl
import streamlit as st

from dashboard import charts, experts, reads

WINDOW_MAX = 256
VALUE_TITLES = {"token share": "share", "activation RMS": "RMS", "max-to-median ratio": "÷ median"}


def _draw(
    cells: pl.DataFrame,
    *,
    chart_id: str,
    title: str,
    view: str,
    step: int,
    window: tuple[int, int] | None = None,
) -> None:
    if cells.height == 0:
        st.info("no per-expert statistics here (no MoE layers recorded?)")
        return
    st.altair_chart(
        charts.heatmap_chart(
            cells,
            chart_id=chart_id,
            title=title,
            value_title=VALUE_TITLES[view],
            step=step,
            window=window,
        ),
        width="content",
    )
    starved = experts.cell_names(cells.filter(~pl.col("dead")), "starved")
    when = "at this step" if window is None else "on every step of the window"
    st.caption(
        f"starved {when} (share < {experts.SHARE_THRESHOLD:g} × uniform or RMS < "
        f"{experts.RMS_THRESHOLD:g} × layer median): {starved or 'none'}"
    )


def _cells(
    wide: pl.DataFrame, build: Callable[[pl.DataFrame], pl.DataFrame]
) -> pl.DataFrame | None:
    """The heatmap cells of an expert-wide read (empty stays empty), or None after showing
    the warning when the run lacks what the view needs."""
    try:
        return build(wide) if wide.height else wide
    except KeyError as e:
        st.warning(str(e.args[0]))
        return None


def heatmaps(
    url: str, run: str, row: dict[str, Any], lo: int, step: int, events: pl.DataFrame
) -> None:
    st.subheader("Experts: layer × expert")
    cols = st.columns([3, 1])
    view = cols[0].radio("view", experts.VIEWS, key="hm_view", horizontal=True)
    window = int(cols[1].number_input("window (steps)", 1, WINDOW_MAX, value=16, key="hm_window"))
    stats = experts.stats_for(view)
    dead = experts.dead_experts(events, step)
    names = ", ".join(f"layer{lay:02d}/expert{e:03d}" for lay, e in sorted(dead))
    st.caption(
        f"declared dead by the detector by step {step}: {names}"
        if dead
        else f"no expert declared dead by step {step} (expert_death events)"
    )
    left, right = st.columns(2)
    with left, st.container(key="heatmap-step"):
        st.caption(f"Heatmap at step {step}")
        cells = _cells(
            reads.expert_wide(url, run, step, step, stats, row),
            lambda wide: experts.heatmap_at(wide, view, dead),
        )
        if cells is not None:
            _draw(
                cells, chart_id="heatmap_step", title=f"{view} at step {step}", view=view, step=step
            )
    first = max(lo, step - window + 1)
    with right, st.container(key="heatmap-window"):
        how = (
            "each expert's share of the window's tokens"
            if view == "token share"
            else "mean over the window's steps in which the expert got tokens"
        )
        st.caption(f"Heatmap over steps {first}–{step}: {how}")
        cells = _cells(
            reads.expert_wide(url, run, first, step, stats, row),
            lambda wide: experts.heatmap_window(wide, view, dead),
        )
        if cells is not None:
            _draw(
                cells,
                chart_id="heatmap_window",
                title=f"{view}, steps {first}–{step}",
                view=view,
                step=step,
                window=(first, step),
            )
