"""hooks.Monitor and hooks.NullMonitor have the call points of the loop's interface
(model/monitoring.py `TrainingMonitor`), signatures included: hooks/ cannot import model/, so
only this test ties the two together."""

from __future__ import annotations

import inspect
import typing

import pytest

from hooks import Monitor, MonitorConfig, NullMonitor, create_monitor
from model.monitoring import CALL_POINTS, DeferredMonitor, TrainingMonitor


def mismatches(cls: type, protocol: type = TrainingMonitor) -> list[str]:
    """What keeps `cls` from being called as `protocol` is called; [] when it conforms: every
    parameter of each call point in the same place, of the same kind, with the same default and
    annotation; anything more must be optional."""
    out = []
    for name in CALL_POINTS:
        impl = getattr(cls, name, None)
        if not callable(impl):
            out.append(f"{name}: missing")
            continue
        spec = getattr(protocol, name)
        want, got = inspect.signature(spec), inspect.signature(impl)
        want_types, got_types = typing.get_type_hints(spec), typing.get_type_hints(impl)
        if list(got.parameters)[: len(want.parameters)] != list(want.parameters):
            out.append(f"{name}: parameters {list(got.parameters)} != {list(want.parameters)}")
            continue
        for p in want.parameters.values():
            q = got.parameters[p.name]
            if (q.kind, q.default) != (p.kind, p.default):
                out.append(f"{name}({p.name}): kind/default {q.kind}/{q.default!r}")
            if got_types.get(p.name) != want_types.get(p.name):
                out.append(f"{name}({p.name}): {got_types.get(p.name)} != {want_types.get(p.name)}")
        for q in list(got.parameters.values())[len(want.parameters) :]:
            optional = q.kind in (q.VAR_POSITIONAL, q.VAR_KEYWORD) or q.default is not q.empty
            if not optional:
                out.append(f"{name}({q.name}): required, the loop never passes it")
        if got_types.get("return") != want_types.get("return"):
            out.append(f"{name}: returns {got_types.get('return')}")
    return out


def test_the_protocol_lists_the_loops_call_points():
    assert CALL_POINTS == ("attach", "step_begin", "before_optimizer", "step_end", "close")


@pytest.mark.parametrize("cls", [Monitor, NullMonitor, DeferredMonitor])
def test_monitors_conform_to_the_loops_protocol(cls):
    assert mismatches(cls) == []


def test_instances_pass_the_runtime_check():
    mon = Monitor(None, target="127.0.0.1:9", run="x", config=MonitorConfig(close_timeout_s=0.1))
    try:
        assert isinstance(mon, TrainingMonitor)
        assert isinstance(NullMonitor(), TrainingMonitor)
        assert isinstance(create_monitor(target="off"), TrainingMonitor)
        assert isinstance(DeferredMonitor(lambda m, o: NullMonitor()), TrainingMonitor)
    finally:
        mon.close()
    assert not isinstance(object(), TrainingMonitor)


def test_a_wrong_signature_is_caught():
    class Drifted(NullMonitor):
        def step_end(self, step: int, loss: float) -> None:  # other parameters dropped
            pass

        def close(self, timeout: float) -> None:  # required: the loop calls close()
            pass

        def attach(self, model, optimizer=None) -> None:  # annotations lost
            pass

    found = mismatches(Drifted)
    assert any(m.startswith("step_end: parameters") for m in found)
    assert any(m.startswith("close(timeout): required") for m in found)
    assert any(m.startswith("attach(model):") for m in found)
    assert not any(m.startswith(("step_begin", "before_optimizer")) for m in found)
