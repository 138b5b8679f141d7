"""Compare runs: curves of two or more runs overlaid on one step axis."""

from __future__ import annotations

import streamlit as st

from dashboard import charts, data, reads

DEFAULT_METRICS = ("train/loss", "grad/global_norm")


def compare(url: str, runs: list[str]) -> None:
    st.subheader("Compare runs")
    if len(runs) < 2:
        st.info("pick two or more runs in the sidebar to overlay their curves")
        return
    rows = {r: reads.run_row(url, r) for r in runs}
    runs = [r for r in runs if rows[r] is not None]
    names: set[str] | None = None
    for r in runs:
        have = set(reads.metrics(url, r, reads.version_of(rows[r]))["name"].to_list())
        names = have if names is None else names & have
    common = sorted(names or ())
    if not common:
        st.warning("these runs share no metric names")
        return
    st.multiselect(
        "metrics (recorded by every selected run)",
        common,
        default=[m for m in DEFAULT_METRICS if m in common] or common[:1],
        key="cmp_metrics",
    )
    for metric in st.session_state.cmp_metrics:
        series = {r: reads.series(url, r, metric, reads.version_of(rows[r])) for r in runs}
        long, notes = data.align_runs(series)
        with st.container(key=f"compare-{metric.replace('/', '-')}"):
            st.altair_chart(
                charts.line_chart(
                    long, chart_id=f"compare:{metric}", title=metric, color="run", runs=runs
                ),
                width="stretch",
            )
            for run, ds in zip([r for r in runs if series[r].height], notes):
                if ds.downsampled:
                    st.caption(f"{run}: {ds.caption()}")
            empty = [r for r in runs if series[r].height == 0]
            if empty:
                st.caption("no values yet: " + ", ".join(empty))
