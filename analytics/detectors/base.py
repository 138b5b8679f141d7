"""What every detector shares: the observe/state interface and state (de)serialisation.

A detector is a dataclass: its public fields are thresholds (documented where they are
declared, with the literature they come from), its private `_fields` are state. It consumes one
step at a time, `observe(frame, index) -> list[Event]`, and must give the same events whether
it runs online in the collector or offline over a store, so it may depend on nothing but the
frames it is shown, in step order. `state_dict()` / `load_state_dict()` carry the private state
(numpy arrays, rolling windows, scalars) across a restart.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from analytics.catalog import MetricIndex
from analytics.events import Event
from analytics.frame import StepFrame
from analytics.rolling import Rolling


def _fields(detector: Any) -> tuple[dataclasses.Field, ...]:
    """The dataclass fields of a detector (its subclasses are dataclasses; this base is not)."""
    return dataclasses.fields(detector)


class Detector:
    """Base of the detector dataclasses (not itself a dataclass)."""

    kind: str = "detector"

    def observe(self, frame: StepFrame, index: MetricIndex) -> list[Event]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The thresholds (public fields)."""
        return {f.name: getattr(self, f.name) for f in _fields(self) if not f.name.startswith("_")}

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in _fields(self):
            if not f.name.startswith("_"):
                continue
            v = getattr(self, f.name)
            if isinstance(v, Rolling):
                out[f.name] = {"rolling": v.state_dict(), "shape": v.shape, "size": v.size}
            elif isinstance(v, np.ndarray):
                out[f.name] = v.copy()
            elif isinstance(v, dict):
                out[f.name] = {
                    k: (x.copy() if isinstance(x, np.ndarray) else x) for k, x in v.items()
                }
            else:
                out[f.name] = v
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        names = {f.name for f in _fields(self) if f.name.startswith("_")}
        unknown = set(state) - names
        if unknown:
            raise ValueError(f"{type(self).__name__} state has unknown entries {sorted(unknown)}")
        for name, v in state.items():
            if isinstance(v, dict) and "rolling" in v:
                r = Rolling(tuple(v["shape"]), int(v["size"]))
                r.load_state_dict(v["rolling"])
                v = r
            elif isinstance(v, np.ndarray):
                v = v.copy()
            setattr(self, name, v)


def check_positive(obj: Any, *names: str, integer: bool = False) -> None:
    """__post_init__ helper: clear errors for thresholds that make no sense."""
    for name in names:
        v = getattr(obj, name)
        bad = (
            isinstance(v, bool)
            or not isinstance(v, (int, float))
            or not v > 0
            or (integer and not isinstance(v, int))
        )
        if bad:
            kind = "a positive integer" if integer else "a positive number"
            raise ValueError(f"{type(obj).__name__}.{name} must be {kind}, got {v!r}")


def fit_state(arr: np.ndarray | None, shape: tuple[int, ...], fill: Any, dtype=float) -> np.ndarray:
    """A state array of `shape`: the old one if it already fits, else a fresh one (the
    dictionary grew, e.g. a layer appeared: its history starts now)."""
    if arr is not None and arr.shape == shape:
        return arr
    return np.full(shape, fill, dtype=dtype)
