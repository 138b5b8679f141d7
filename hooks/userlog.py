"""The user's own scalars: `monitor.log({"eval/loss": v, ...}, step=..., reduce="mean")`.

Values are held per step and travel with that step's vector, as one more schema: each distinct
set of names gets a schema of its own (registered with the collector the first time it is
used), so a step carries exactly the names logged for it and nothing is laid out as a NaN
placeholder. The reduce op (how ranks combine, default mean) is fixed by a name's first use.

Which step: `step=None` is the open step (between step_begin and step_end) or, between steps,
the next one; a frameworks' "log after the step" (Trainer.on_log, Lightning validation) logs
at the step that comes next. A value for a step already sent cannot join it (the collector
has reduced it): it is dropped, counted (`user_values_late`) and warned about once. Values
may be tensors: they are read on the sender thread, so `log` itself never syncs the device.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from hooks.layout import MetricSpec

FIRST_USER_SCHEMA_ID = 3  # 1 and 2 are the step and periodic schemas (hooks.layout)
MAX_USER_SCHEMAS = 32  # the collector accepts 64 schemas per rank and run
MAX_PENDING_STEPS = 64
REDUCES = ("mean", "sum", "max", "min")
NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")
MAX_NAME_CHARS = 512


class UserValues:
    """A step's user values, read on the sender thread (tensors synced there)."""

    def __init__(self, values: list[Any]) -> None:
        self._values = values

    def array(self) -> np.ndarray:
        out = np.empty(len(self._values), dtype=np.float32)
        for i, v in enumerate(self._values):
            out[i] = float(v.detach()) if isinstance(v, torch.Tensor) else float(v)
        return out

    def __len__(self) -> int:
        return len(self._values)


class UserScalars:
    def __init__(
        self,
        reserved: set[str],
        add_schema: Callable[[int, list[MetricSpec]], None],
        bump: Callable[[str, int], None],
        warn: Callable[[str], None],
    ) -> None:
        self.reserved, self.add_schema, self.bump, self.warn = reserved, add_schema, bump, warn
        self.reduce_of: dict[str, str] = {}
        self.schemas: dict[tuple[str, ...], int] = {}
        self.pending: dict[int, dict[str, Any]] = {}

    def check(self, metrics: Mapping[str, Any], reduce: str | Mapping[str, str]) -> dict:
        """Validate a log() call (the user's code: raises ValueError / TypeError)."""
        if not isinstance(metrics, Mapping):
            raise TypeError(f"log() takes a dict of name -> value, got {type(metrics).__name__}")
        out: dict[str, Any] = {}
        for name, value in metrics.items():
            if not isinstance(name, str) or len(name) > MAX_NAME_CHARS or not NAME_RE.match(name):
                raise ValueError(f"metric name {name!r} must be '/'-separated [A-Za-z0-9_.-]")
            if name in self.reserved:
                raise ValueError(f"{name!r} is one of stepwatch's own metrics")
            op = reduce.get(name, "mean") if isinstance(reduce, Mapping) else reduce
            if op not in REDUCES:
                raise ValueError(f"reduce for {name!r} must be one of {REDUCES}, got {op!r}")
            if self.reduce_of.setdefault(name, op) != op:
                raise ValueError(
                    f"{name!r} was first logged with reduce={self.reduce_of[name]!r}, now {op!r}"
                )
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"{name!r}: a tensor value must hold one element")
                value = value.detach()
            elif isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name!r}: value must be a number or a 1-element tensor")
            out[name] = value  # a non-finite value is data (the detectors flag it), not an error
        return out

    def hold(self, step: int, values: dict[str, Any], first_open: int) -> None:
        """Keep values for `step` (>= first_open, the first step not yet sent)."""
        if step < first_open:
            self.bump("user_values_late", len(values))
            self.warn(f"log(step={step}): step {step} was already sent; values dropped")
            return
        if step not in self.pending and len(self.pending) >= MAX_PENDING_STEPS:
            self.bump("user_values_dropped", len(values))
            self.warn(f"log(): more than {MAX_PENDING_STEPS} future steps held; values dropped")
            return
        self.pending.setdefault(step, {}).update(values)

    def take(self, step: int) -> tuple[int, UserValues] | None:
        """(schema id, values) of the user values held for `step`, registering a new schema
        the first time a set of names is used; None when there are none."""
        values = self.pending.pop(step, None)
        if not values:
            return None
        names = tuple(sorted(values))
        sid = self.schemas.get(names)
        if sid is None:
            if len(self.schemas) >= MAX_USER_SCHEMAS:
                self.bump("user_values_dropped", len(values))
                self.warn(f"log(): more than {MAX_USER_SCHEMAS} distinct name sets; dropped")
                return None
            sid = self.schemas[names] = FIRST_USER_SCHEMA_ID + len(self.schemas)
            specs = [MetricSpec(n, self.reduce_of[n], n.rsplit("/", 1)[-1]) for n in names]
            self.add_schema(sid, specs)
        return sid, UserValues([values[n] for n in names])

    def steps_held(self) -> list[int]:
        return sorted(self.pending)
