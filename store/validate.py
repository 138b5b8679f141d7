"""Write validation: the records and numpy columns a writer hands over -> checked polars frames.

Writes arrive as numpy columns (ValueBatch, MetricDict) or small records (StepStatus,
EventRecord, ClipRecord) and leave here as polars frames with the exact schemas of frames.py,
copied so the caller may reuse its buffers at once. Anything malformed raises InvalidInput
naming the field; nothing is coerced silently except float64 values beyond float32's range,
which become inf (and are kept). Raw per-rank values go on to vectors.py.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import polars as pl

from store.base import (
    REDUCE_OPS,
    SEVERITIES,
    ClipRecord,
    EventRecord,
    InvalidInput,
    MetricDict,
    StepStatus,
    ValueBatch,
)
from store.frames import (
    CLIPS_SCHEMA,
    DETECTOR_STATE_SCHEMA,
    EVENTS_SCHEMA,
    METRICS_SCHEMA,
    RAW_SCHEMA,
    REDUCED_SCHEMA,
    STEPS_SCHEMA,
    last_wins,
)

I32_MAX = 2**31 - 1
I64_MAX = 2**63 - 1


# ---- columns -----------------------------------------------------------------------------
def int_column(name: str, x: Any, dtype: type[np.integer], *, low: int) -> np.ndarray:
    """A 1-D integer column in [low, dtype's max] as a fresh array of `dtype`."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise InvalidInput(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.empty(0, dtype=dtype)
    if arr.dtype.kind not in "iu":
        raise InvalidInput(f"{name} must hold integers, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    top = I32_MAX if dtype == np.int32 else I64_MAX
    if lo < low or hi > top:
        raise InvalidInput(f"{name} values must lie in [{low}, {top}], got [{lo}, {hi}]")
    return np.array(arr, dtype=dtype, copy=True)  # copy: the caller may reuse its buffer


def _str_column(name: str, x: Any, n: int) -> list[str] | pl.Series:
    if isinstance(x, pl.Series):  # columnar (the collector's registry): checked as a column
        if x.dtype != pl.Utf8 or x.len() != n or x.null_count():
            raise InvalidInput(f"{name} must be {n} strings (a Utf8 Series without nulls)")
        return x.rename(name)
    if isinstance(x, str) or len(x) != n:
        raise InvalidInput(f"{name} must be a list of {n} strings")
    out = list(x)
    if not all(isinstance(s, str) for s in out):
        raise InvalidInput(f"{name} must hold only strings")
    return out


def metrics_frame(md: MetricDict) -> pl.DataFrame:
    """MetricDict -> frame (METRICS_SCHEMA), last row wins for a repeated metric_id."""
    if not isinstance(md, MetricDict):
        raise InvalidInput(f"expected MetricDict, got {type(md).__name__}")
    ids = int_column("metric_id", md.metric_id, np.int32, low=0)
    n = ids.size
    cols: dict[str, Any] = {"metric_id": ids}
    for key in ("layer", "expert", "head"):
        col = int_column(key, getattr(md, key), np.int32, low=-1)
        if col.size != n:
            raise InvalidInput(
                f"ragged metric dictionary: {key} has {col.size} rows, metric_id has {n}"
            )
        cols[key] = col
    for key in ("name", "stat", "unit", "reduce"):
        cols[key] = _str_column(key, getattr(md, key), n)
    names = cols["name"]
    if (names.str.len_bytes().min() == 0) if isinstance(names, pl.Series) else not all(names):
        raise InvalidInput("metric names must be non-empty")
    reduce = cols["reduce"]
    bad = sorted(set(reduce.unique().to_list() if isinstance(reduce, pl.Series) else reduce))
    bad = [r for r in bad if r not in REDUCE_OPS]
    if bad:
        raise InvalidInput(f"reduce must be one of {REDUCE_OPS}, got {bad}")
    df = pl.DataFrame(cols, schema=METRICS_SCHEMA)
    return last_wins(df, ["metric_id"])


def _int(value: object) -> int:
    assert isinstance(value, int)  # an i32 column's min/max
    return value


def merge_metrics(old: pl.DataFrame, new: pl.DataFrame) -> pl.DataFrame:
    """Upsert `new` into `old` by metric_id; names must stay unique (series() reads by name).
    The usual write only appends ids above the old ones (a collector registers a wide rank's
    metrics in many parts): that costs one hash lookup per new name, not a re-sort of all."""
    if old.height and new.height and _int(new["metric_id"].min()) > _int(old["metric_id"].max()):
        names = new["name"]
        if not (names.is_duplicated().any() or names.is_in(old["name"].implode()).any()):
            return pl.concat([old, new])
    merged = last_wins(pl.concat([old, new]), ["metric_id"]).sort("metric_id")
    dup = merged.filter(pl.col("name").is_duplicated())
    if dup.height:
        pairs = dup.select("name", "metric_id").head(6).rows()
        raise InvalidInput(f"metric names must be unique within a run; shared by ids: {pairs}")
    return merged


def values_frame(batch: ValueBatch, table: str) -> pl.DataFrame:
    """ValueBatch -> frame of RAW_SCHEMA ("raw": rank set) or REDUCED_SCHEMA ("reduced")."""
    cols = values_arrays(batch, table)
    schema = RAW_SCHEMA if table == "raw" else REDUCED_SCHEMA
    return pl.DataFrame({k: cols[k] for k in schema}, schema=schema)


def values_arrays(batch: ValueBatch, table: str) -> dict[str, np.ndarray]:
    """ValueBatch -> its validated columns as numpy arrays, the dtypes of RAW_SCHEMA ("raw":
    rank set) or REDUCED_SCHEMA ("reduced"), value a copy: values_frame without the frame,
    for a writer that goes on in numpy (the vector codecs)."""
    if not isinstance(batch, ValueBatch):
        raise InvalidInput(f"expected ValueBatch, got {type(batch).__name__}")
    per_row, other = ("rank", "n_ranks") if table == "raw" else ("n_ranks", "rank")
    if getattr(batch, per_row) is None:
        raise InvalidInput(f"{table} values need batch.{per_row}")
    if getattr(batch, other) is not None:
        raise InvalidInput(f"{table} values take batch.{per_row}, not batch.{other}")
    cols = {
        "step": int_column("step", batch.step, np.int64, low=0),
        "metric_id": int_column("metric_id", batch.metric_id, np.int32, low=0),
        per_row: int_column(per_row, getattr(batch, per_row), np.int32, low=0),
    }
    value = np.asarray(batch.value)
    if value.ndim != 1 or (value.size and value.dtype.kind not in "fiu"):
        raise InvalidInput(f"value must be a 1-D numeric array, got {value.dtype} {value.shape}")
    with np.errstate(over="ignore"):  # f64 beyond f32 range becomes inf, kept
        cols["value"] = np.array(value, dtype=np.float32, copy=True)
    lengths = {k: v.size for k, v in cols.items()}
    if len(set(lengths.values())) != 1:
        raise InvalidInput(f"ragged value batch: column lengths {lengths}")
    return cols


# ---- records -----------------------------------------------------------------------------
def steps_frame(steps: list[StepStatus]) -> pl.DataFrame:
    """StepStatus list -> frame (STEPS_SCHEMA). One Python object per step, never per value."""
    if isinstance(steps, StepStatus):
        steps = [steps]
    rows: dict[str, list[Any]] = {k: [] for k in STEPS_SCHEMA}
    for s in steps:
        if not isinstance(s, StepStatus):
            raise InvalidInput(f"expected StepStatus, got {type(s).__name__}")
        if not isinstance(s.step, (int, np.integer)) or s.step < 0:
            raise InvalidInput(f"step must be an integer >= 0, got {s.step!r}")
        if not isinstance(s.n_ranks, (int, np.integer)) or not 0 <= s.n_ranks <= I32_MAX:
            raise InvalidInput(f"n_ranks must be an integer >= 0, got {s.n_ranks!r}")
        missing = [_check_rank(r) for r in s.missing_ranks]
        if not isinstance(s.wall_time, (int, float)) or not math.isfinite(s.wall_time):
            raise InvalidInput(f"wall_time must be a finite number, got {s.wall_time!r}")
        rows["step"].append(int(s.step))
        rows["n_ranks"].append(int(s.n_ranks))
        rows["missing_ranks"].append(missing)
        rows["complete"].append(bool(s.complete))
        rows["wall_time"].append(float(s.wall_time))
    return pl.DataFrame(rows, schema=STEPS_SCHEMA)


def int_field(what: str, v: object, low: int, top: int = I64_MAX) -> int:
    """One integer in [low, top] (bool is refused: True is not a step)."""
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or not low <= v <= top:
        raise InvalidInput(f"{what} must be an integer in [{low}, {top}], got {v!r}")
    return int(v)


def _text_field(what: str, v: object, *, empty: bool = False) -> str:
    if not isinstance(v, str) or (not empty and not v):
        raise InvalidInput(f"{what} must be a {'' if empty else 'non-empty '}string, got {v!r}")
    return v


def _float_field(what: str, v: object, *, nan: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise InvalidInput(f"{what} must be a number, got {v!r}")
    if not nan and math.isnan(v):
        raise InvalidInput(f"{what} must not be NaN")
    return float(v)


def events_frame(events: list[EventRecord]) -> pl.DataFrame:
    """EventRecord list -> frame (EVENTS_SCHEMA). Values may be non-finite (a NaN loss is
    exactly what a non-finite event reports); detail must be JSON object text."""
    rows: dict[str, list[Any]] = {k: [] for k in EVENTS_SCHEMA}
    for e in [events] if isinstance(events, EventRecord) else events:
        if not isinstance(e, EventRecord):
            raise InvalidInput(f"expected EventRecord, got {type(e).__name__}")
        step = int_field("event step", e.step, 0)
        onset = int_field("event onset_step", e.onset_step, 0)
        if onset > step:
            raise InvalidInput(f"event onset_step {onset} lies after its step {step}")
        if e.severity not in SEVERITIES:
            raise InvalidInput(f"event severity must be one of {SEVERITIES}, got {e.severity!r}")
        detail = _text_field("event detail", e.detail)
        try:
            ok = isinstance(json.loads(detail), dict)
        except ValueError:
            ok = False
        if not ok:
            raise InvalidInput(f"event detail must be a JSON object, got {detail[:80]!r}")
        rows["step"].append(step)
        rows["kind"].append(_text_field("event kind", e.kind))
        rows["site"].append(_text_field("event site", e.site, empty=True))
        rows["value"].append(_float_field("event value", e.value, nan=True))
        rows["threshold"].append(_float_field("event threshold", e.threshold, nan=True))
        rows["severity"].append(e.severity)
        rows["onset_step"].append(onset)
        rows["detail"].append(detail)
    return pl.DataFrame(rows, schema=EVENTS_SCHEMA)


def clips_frame(clips: list[ClipRecord]) -> pl.DataFrame:
    """ClipRecord list -> frame (CLIPS_SCHEMA). limit inf means "off"; NaN is refused."""
    rows: dict[str, list[Any]] = {k: [] for k in CLIPS_SCHEMA}
    for c in [clips] if isinstance(clips, ClipRecord) else clips:
        if not isinstance(c, ClipRecord):
            raise InvalidInput(f"expected ClipRecord, got {type(c).__name__}")
        rows["version"].append(int_field("clip version", c.version, 1))
        rows["step"].append(int_field("clip step", c.step, 0))
        rows["layer"].append(int_field("clip layer", c.layer, 0, I32_MAX))
        rows["site"].append(_text_field("clip site", c.site))
        rows["limit"].append(_float_field("clip limit", c.limit, nan=False))
        rows["reason"].append(_text_field("clip reason", c.reason, empty=True))
        rows["acked_step"].append(int_field("clip acked_step", c.acked_step, -1))
    return pl.DataFrame(rows, schema=CLIPS_SCHEMA)


def detector_state_frame(kind: str, step: int, state: bytes) -> pl.DataFrame:
    """One saved detector state -> frame (DETECTOR_STATE_SCHEMA), the blob as it is."""
    if not isinstance(state, (bytes, bytearray, memoryview)):
        raise InvalidInput(f"detector state must be bytes, got {type(state).__name__}")
    row = {
        "kind": [_text_field("detector state kind", kind)],
        "step": [int_field("detector state step", step, 0)],
        "state": [bytes(state)],
    }
    return pl.DataFrame(row, schema=DETECTOR_STATE_SCHEMA)


def _check_rank(r: object) -> int:
    if not isinstance(r, (int, np.integer)) or not 0 <= r <= I32_MAX:
        raise InvalidInput(f"missing_ranks must hold integers >= 0, got {r!r}")
    return int(r)
