"""Metric explorer: any metrics by name glob and labels, every point accounted for.

Each series is min/max downsampled (data.downsample_minmax) and the page says so; when more
metrics match than the chart takes, the page says how many were left out and why.
"""

from __future__ import annotations

from typing import Any

import polars as pl
import streamlit as st

from dashboard import charts, data, reads
from store import InvalidInput

DEFAULT_PATTERN = "train/*"
DEFAULT_LIMIT = 12


def _labels(df: pl.DataFrame, col: str) -> list:
    return sorted(v for v in df[col].unique().to_list() if v is not None and v != -1 and v != "")


def explorer(url: str, run: str, row: dict[str, Any], step: int | None) -> None:
    st.subheader(f"Metric explorer · {run}")
    version = reads.version_of(row)
    dictionary = reads.metrics(url, run, version)
    cols = st.columns([3, 1, 1], vertical_alignment="bottom")
    pattern = cols[0].text_input(
        "name pattern (glob: * ? [abc])", DEFAULT_PATTERN, key="ex_pattern"
    )
    limit = int(cols[1].number_input("max series", 1, 100, DEFAULT_LIMIT, key="ex_limit"))
    log_y = cols[2].checkbox("log y", key="ex_log")
    try:
        matched = data.filter_metrics(dictionary, pattern)
    except InvalidInput as e:
        st.error(f"bad pattern: {e}")
        return
    fcols = st.columns(4)
    picks = {
        col: fcols[i].multiselect(col, _labels(matched, col), key=f"ex_{col}")
        for i, col in enumerate(("layer", "expert", "head", "stat"))
    }
    matched = data.filter_metrics(
        matched,
        "*",
        layers=picks["layer"],
        experts=picks["expert"],
        heads=picks["head"],
        stats=picks["stat"],
    )
    if matched.height == 0:
        st.info(
            f"no metric of {run} matches {pattern!r} and the label filters "
            f"({dictionary.height} metrics recorded)"
        )
        return
    names = matched["name"].to_list()
    shown = names[:limit]
    if len(names) > limit:
        st.warning(
            f"{len(names)} metrics match; plotting the first {limit} by name — "
            "narrow the pattern or labels, or raise 'max series'"
        )
    else:
        st.caption(f"{len(names)} metric{'s' if len(names) != 1 else ''} match")
    parts, notes = [], []
    for name in shown:
        ds = data.downsample_minmax(reads.series(url, run, name, version))
        notes.append((name, ds))
        parts.append(ds.frame.with_columns(series=pl.lit(name)))
    long = pl.concat(parts)
    if log_y and (long["value"] <= 0).any():
        st.caption("log scale off: some values are ≤ 0")
        log_y = False
    with st.container(key="explorer-chart"):
        st.altair_chart(
            charts.line_chart(
                long,
                chart_id="explorer",
                title=pattern,
                step_now=step,
                log_y=log_y,
                legend="right",
                names=shown,
            ),
            width="stretch",
        )
    for name, ds in notes:
        if ds.downsampled:
            st.caption(f"{name}: {ds.caption()}")
