"""Layer x expert heatmap cells: the view's value, starvation, and detector-declared deaths.

Two cues, kept apart on purpose:
  starved  this step (or every step of the window) the expert is below analytics' ExpertDeath
           thresholds - token share < share_threshold x uniform, or activation RMS <
           rms_threshold x the layer median (Step 3.5 Flash section 4.1). Starvation alone is
           not death: balancing feeds most starved experts again.
  dead     the detector said so: an expert_death event for the site at or before the replay
           step, with no expert_revival after it. The detector owns the rule (a window of
           starved steps, parameter-norm decay); the dashboard only shows its verdict.

The starvation expressions mirror analytics.detectors.expert_death.layer_shares and
layer_relative (numpy, one [L, E] matrix per step) as polars expressions over many steps at
once; tests/dashboard/test_experts.py checks that they agree.
"""

from __future__ import annotations

import re

import polars as pl

from analytics.detectors.expert_death import ExpertDeath
from analytics.events import EXPERT_DEATH, EXPERT_REVIVAL

SHARE_THRESHOLD: float = ExpertDeath.share_threshold  # x uniform share
RMS_THRESHOLD: float = ExpertDeath.rms_threshold  # x layer median RMS
EXPERT_PREFIX = "moe/"  # grad/ and params/ also carry expert labels; heatmaps are moe/ only
HEATMAP_PATTERN = "moe/*/expert*/*"
VIEWS = ("token share", "activation RMS", "max-to-median ratio")
VIEW_STATS = {
    "token share": "tokens",
    "activation RMS": "act_rms",
    "max-to-median ratio": "out_norm",
}  # Step 3.5 Flash Fig. 4: per-expert out norms
BASE_STATS = ("act_rms", "tokens")  # what starvation needs, whatever the view
SITE_RE = re.compile(r"^moe/layer(\d+)/expert(\d+)$")
CELL_COLUMNS = ("layer", "expert", "value", "share", "tokens", "starved", "dead")


def stats_for(view: str) -> tuple[str, ...]:
    return tuple(sorted({*BASE_STATS, VIEW_STATS[view]}))


def expert_stats(long: pl.DataFrame) -> pl.DataFrame:
    """at_step-shaped rows (name, layer, expert, stat, value[, step]) -> one row per
    ([step,] layer, expert) with one column per stat. Only moe/ expert metrics count."""
    index = ["step", "layer", "expert"] if "step" in long.columns else ["layer", "expert"]
    empty = pl.DataFrame(schema={k: pl.Int64 if k == "step" else pl.Int32 for k in index})
    if long.height == 0:
        return empty
    rows = long.filter(
        pl.col("name").str.starts_with(EXPERT_PREFIX), pl.col("expert") >= 0, pl.col("layer") >= 0
    )
    if rows.height == 0:
        return empty
    return (
        rows.select(*index, "stat", pl.col("value").cast(pl.Float64))
        .pivot(on="stat", index=index, values="value", aggregate_function="first")
        .sort(index)
    )


def _per_step_cells(wide: pl.DataFrame, view: str) -> pl.DataFrame:
    """Per ([step,] layer, expert): share of the layer's tokens, the view's value, starved."""
    if view not in VIEWS:
        raise ValueError(f"unknown heatmap view {view!r}; choose one of {VIEWS}")
    group = ["step", "layer"] if "step" in wide.columns else ["layer"]
    missing = set(stats_for(view)) - set(wide.columns)
    if missing:
        raise KeyError(f"heatmap {view!r} needs stats {sorted(missing)} that the run lacks")
    tokens, rms = pl.col("tokens"), pl.col("act_rms")
    total = tokens.sum().over(group)
    share = pl.when(total > 0).then(tokens / total).otherwise(None)
    n_seen = tokens.is_not_nan().sum().over(group)  # layer_shares' n_E
    share_rel = pl.when(total > 0).then(tokens * n_seen / total).otherwise(None)
    median_rms = rms.median().over(group)  # layer_relative's median
    rms_rel = pl.when(median_rms > 0).then(rms / median_rms).otherwise(None)
    starved = share_rel.is_not_null() & (
        (share_rel < SHARE_THRESHOLD) | (rms_rel.is_not_null() & (rms_rel < RMS_THRESHOLD))
    )
    if view == "token share":
        value = share
    elif view == "activation RMS":
        value = rms
    else:  # ratio to the median of experts that got tokens this step
        active = pl.when(tokens > 0).then(pl.col("out_norm")).otherwise(None)
        median = active.median().over(group)
        value = (
            pl.when((tokens > 0) & (median > 0)).then(pl.col("out_norm") / median).otherwise(None)
        )
    return wide.with_columns(share=share, value=value, starved=starved.fill_null(False))


def _with_dead(cells: pl.DataFrame, dead: frozenset[tuple[int, int]]) -> pl.DataFrame:
    keys = pl.concat_str(
        pl.col("layer").cast(pl.Utf8), pl.col("expert").cast(pl.Utf8), separator="/"
    )
    return cells.with_columns(dead=keys.is_in([f"{lay}/{e}" for lay, e in dead]))


def heatmap_at(
    wide: pl.DataFrame, view: str, dead: frozenset[tuple[int, int]] = frozenset()
) -> pl.DataFrame:
    """One step's cells (CELL_COLUMNS). A layer that routed no tokens has null shares and
    no starved experts; `dead` is dead_experts() at this step."""
    if "step" in wide.columns and wide["step"].n_unique() > 1:
        raise ValueError("heatmap_at takes one step; use heatmap_window for several")
    cells = _per_step_cells(wide.drop("step", strict=False), view)
    return _with_dead(cells, dead).select(CELL_COLUMNS).sort("layer", "expert")


def heatmap_window(
    wide: pl.DataFrame, view: str, dead: frozenset[tuple[int, int]] = frozenset()
) -> pl.DataFrame:
    """Cells over several steps (CELL_COLUMNS + steps): token share = the expert's tokens over
    the layer's tokens in the window; other views = mean of the per-step values over the steps
    the expert got tokens in; starved = starved on every step of the window."""
    if "step" not in wide.columns:
        raise ValueError("heatmap_window needs a step column")
    layer_total = pl.col("tokens").sum().over("layer")
    agg = (
        _per_step_cells(wide, view)
        .group_by("layer", "expert")
        .agg(
            pl.col("tokens").sum(),
            pl.col("value").filter(pl.col("tokens") > 0).mean().alias("value_mean"),
            pl.col("starved").all(),
            pl.col("step").n_unique().alias("steps"),
        )
        .with_columns(
            share=pl.when(layer_total > 0).then(pl.col("tokens") / layer_total).otherwise(None)
        )
    )
    value = pl.col("share") if view == "token share" else pl.col("value_mean")
    return (
        _with_dead(agg.with_columns(value=value), dead)
        .select(*CELL_COLUMNS, "steps")
        .sort("layer", "expert")
    )


def dead_experts(events: pl.DataFrame, step: int) -> frozenset[tuple[int, int]]:
    """(layer, expert) pairs the detector declared dead at or before `step` and that did not
    revive since: expert_death / expert_revival events replayed in step order."""
    dead: set[tuple[int, int]] = set()
    rows = events.filter(
        pl.col("step") <= step, pl.col("kind").is_in([EXPERT_DEATH, EXPERT_REVIVAL])
    ).sort("step")
    for kind, site in rows.select("kind", "site").iter_rows():
        m = SITE_RE.match(site or "")
        if m:
            key = (int(m.group(1)), int(m.group(2)))
            (dead.add if kind == EXPERT_DEATH else dead.discard)(key)
    return frozenset(dead)


def cell_names(cells: pl.DataFrame, flag: str, limit: int = 12) -> str:
    """'layer04/expert003, ...' for cells where `flag` holds; a count past `limit`."""
    hit = cells.filter(pl.col(flag))
    names = [f"layer{r['layer']:02d}/expert{r['expert']:03d}" for r in hit.iter_rows(named=True)]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
