"""The user's own scalars: `monitor.log({"eval/loss": v, ...}, step=..., reduce="mean")`.

Values are held per step and travel with that step's vector, each name as a one-metric schema
of its own (registered with the collector the first time it is logged: the collector binds a
metric to one schema per rank), so a step carries exactly the names logged for it and nothing
is laid out as a NaN placeholder. The reduce op (how ranks combine, default mean) is fixed by a
name's first use. At most MAX_USER_NAMES names per run (the collector takes 64 schemas per
rank); more are dropped, counted (`user_values_dropped`) and warned about.

Which step: `step=None` is the open step (between step_begin and step_end) or, between steps,
the next one; a frameworks' "log after the step" (Trainer.on_log, Lightning validation) logs
at the step that comes next. A value for a step already sent cannot join it (the collector
has reduced it): it is dropped, counted (`user_values_late`) and warned about once. Values
may be tensors: they are read on the sender thread, so `log` itself never syncs the device.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch

from hooks.buffer import StepItem
from hooks.layout import MetricSpec

FIRST_USER_SCHEMA_ID = 3  # 1 and 2 are the step and periodic schemas (hooks.layout)
MAX_USER_NAMES = 32  # one schema each: the collector takes 64 per rank (a big model's step
# schema is cut into parts of 16,384 metrics, each a schema too)
MAX_PENDING_STEPS = 64
REDUCES = ("mean", "sum", "max", "min", "mean_nonzero")
USER_STAT = "user"  # the stat label of every logged metric (dashboard: "logged with monitor.log")
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
        self.schemas: dict[str, int] = {}  # name -> its schema id
        self.pending: dict[int, dict[str, Any]] = {}
        self.next_unsent = 0  # every step below this one has been sent
        # A training loop logs the same keys every step: a key set (with its reduce) checked
        # once is not checked again, and a step's set of names maps to its layout once built.
        self._checked: dict[tuple, None] = {}
        self._layouts: dict[tuple[str, ...], tuple[list[tuple[int, int]], list[str]]] = {}

    def _check_name(self, name: object, reduce: str | Mapping[str, str]) -> None:
        """One key of a log() call: its name and reduce op (raises ValueError)."""
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

    def check(self, metrics: Mapping[str, Any], reduce: str | Mapping[str, str]) -> dict:
        """Validate a log() call (the user's code: raises ValueError / TypeError)."""
        if not isinstance(metrics, Mapping):
            raise TypeError(f"log() takes a dict of name -> value, got {type(metrics).__name__}")
        key = (tuple(metrics), reduce if isinstance(reduce, str) else tuple(reduce.items()))
        if key not in self._checked:
            for name in metrics:
                self._check_name(name, reduce)
            if len(self._checked) < 1024:  # bounded: a loop that varies its keys forever
                self._checked[key] = None
        out: dict[str, Any] = {}
        for name, value in metrics.items():
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

    def take(self, step: int) -> tuple[list[tuple[int, int]], UserValues] | None:
        """The user values held for `step`: ([(schema id, 1)] per name, values in that order),
        registering the schema of a name the first time it is logged; None when none."""
        values = self.pending.pop(step, None)
        if not values:
            return None
        key = tuple(values)
        hit = self._layouts.get(key)
        if hit is not None:  # the same names as an earlier step: its layout, no per-key work
            schemas, order = hit
            return schemas, UserValues(list(map(values.__getitem__, order)))
        names = []
        for name in sorted(values):
            if name not in self.schemas and len(self.schemas) >= MAX_USER_NAMES:
                self.bump("user_values_dropped", 1)
                self.warn(f"log(): more than {MAX_USER_NAMES} names in this run; {name} dropped")
                continue
            if name not in self.schemas:
                sid = self.schemas[name] = FIRST_USER_SCHEMA_ID + len(self.schemas)
                # stat "user" tags the user's own metrics: the dashboard and report find them so
                self.add_schema(sid, [MetricSpec(name, self.reduce_of[name], USER_STAT)])
            names.append(name)
        if not names:
            return None
        schemas = [(self.schemas[n], 1) for n in names]
        if len(names) == len(values) and len(self._layouts) < 1024:  # nothing dropped
            self._layouts[key] = (schemas, names)
        return schemas, UserValues([values[n] for n in names])

    def log(
        self,
        metrics: Mapping[str, Any],
        step: int | None,
        reduce: str | Mapping[str, str],
        open_step: int | None,
    ) -> None:
        """Monitor.log: validate, resolve the step (None: the open step, else the next one
        to be sent) and hold the values until that step is sent."""
        values = self.check(metrics, reduce)
        if step is None:
            step = self.next_unsent if open_step is None else open_step
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ValueError(f"step must be an int >= 0, got {step!r}")
        if values:
            self.hold(step, values, self.next_unsent)

    def for_step(
        self, step: int, submit: Callable[[StepItem], Any]
    ) -> tuple[list[tuple[int, int]], UserValues] | None:
        """At the send of `step`: first the held steps before it that have no training step
        (each sent on its own, through `submit`), then (schemas, values) for `step`."""
        for held in sorted(self.pending):
            if held >= step:
                break
            user = self.take(held)
            if user is not None:
                submit(
                    StepItem(
                        step=held,
                        vector=None,
                        schemas=user[0],
                        wall_time=time.time(),
                        user=user[1],
                    )
                )
                self.bump("user_only_steps", 1)
        self.next_unsent = max(self.next_unsent, step + 1)
        return self.take(step)

    def flush(self, submit: Callable[[StepItem], Any]) -> None:
        """At close: what was logged for steps that never ran (after the last one)."""
        self.for_step(1 << 62, submit)
