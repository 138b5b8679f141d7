"""Permanent errors end the stream with one clear error; wide ranks are not one of them.

A rank of 1.1 M metrics with 27-character names used to be cut into schema parts of 16,384
MetricDefs (1.14 MB each, over the collector's 1.06 MiB message limit) and into more than 64
parts: RESOURCE_EXHAUSTED on every connect, retried for the whole run, nothing stored. Now its
schema is cut by encoded bytes and the collector takes the parts: every step lands.

A refusal no resend can cure - a wrong token, a schema over the collector's bounds, a Hello
that contradicts the live run - stops the client after one connect attempt, with one error in
the trainer's log and in Monitor.stats(), while training goes on.
"""

from __future__ import annotations

import gc
import logging

import numpy as np
import pytest

from collector import Collector, CollectorConfig
from collector.process import start_collector, stop_collector
from hooks import MonitorConfig, frames, schemas
from hooks.buffer import StepItem
from hooks.layout import MetricSpec
from hooks.sender import Sender
from proto.v1 import telemetry_pb2 as pb
from store import open_store
from tests.collector.conftest import RawClient, mdef
from tests.integration.monitored import Records, Trainer

pytestmark = pytest.mark.timeout(400)
MESSAGE_LIMIT = CollectorConfig().max_message_bytes  # 1 MiB + 64 KiB


class Vector:
    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def materialize(self) -> np.ndarray:
        return self.values.copy()


def test_a_rank_of_a_million_metrics_registers_and_stores_every_step(tmp_path):
    n, steps = 1_100_000, 3
    specs = [MetricSpec(f"wide/m{i:07d}/abcdefghijklm", "mean", "m") for i in range(n)]
    assert len(specs[0].name) == 27
    url = f"parquet:{tmp_path / 'store'}"
    proc, address = start_collector(
        url, "--insecure", "--flush-interval", "2", log_path=tmp_path / "collector.log"
    )
    try:
        sender = Sender(address, frames.Identity("wide", 0, 1), [(1, specs)], MonitorConfig())
        parts = sender._schemas
        assert len(parts) > 64  # the old per-rank schema limit
        for part_id, part in (parts[0], parts[len(parts) // 2], parts[-1]):
            msg = pb.ClientFrame(schema=schemas.schema(sender.ident, 1, part_id, part).schema)
            assert msg.ByteSize() < MESSAGE_LIMIT
        for step in range(steps):
            values = np.arange(n, dtype=np.float32) + step
            assert sender.submit(StepItem(step, Vector(values), [(1, n)], 1e9 + step))
        assert sender.close(timeout=300)
        stats = sender.stats()
    finally:
        schemas._metric_defs.cache_clear()  # it holds the specs: later tests' GC walks them
        assert stop_collector(proc) == 0
    assert stats["connect_attempts"] == 1 and "fatal_error" not in stats
    with open_store(url) as store:
        assert store.metrics("wide").height == n
        assert store.steps("wide")["step"].to_list() == list(range(steps))
        for i in (0, n // 2, n - 1):  # a metric of the first, a middle and the last part
            series = store.series("wide", specs[i].name, rank=0)
            assert series["value"].to_list() == [float(i + s) for s in range(steps)]
    del specs, parts, sender
    gc.collect()


def _refusal(case: str, tmp_path):
    """(target, Monitor kwargs, run name, world size, cleanup) for one kind of refusal."""
    if case == "token":  # a real collector process with a token from the environment
        proc, address = start_collector(
            "memory:", log_path=tmp_path / "collector.log", env={"STEPWATCH_TOKEN": "right"}
        )
        return address, {"token": "wrong"}, "UNAUTHENTICATED", lambda: stop_collector(proc)
    config = CollectorConfig(insecure=True, flush_interval_s=0.05)
    if case == "schema_bound":
        config.max_metrics_per_run = 100  # the tiny model lays out ~300
    collector = Collector(open_store("memory:"), config)
    address = f"127.0.0.1:{collector.start()}"
    code = "RESOURCE_EXHAUSTED" if case == "schema_bound" else "INVALID_ARGUMENT"
    if case == "contradicts_run":  # the run is live with world size 2; the Monitor says 1
        other = RawClient(address, f"refuse-{case}", 1, 2)
        other.schema(1, [mdef("x")])
        other.wait_ack()
    return address, {}, code, collector.stop


@pytest.mark.parametrize("case", ["token", "schema_bound", "contradicts_run"])
def test_a_permanent_refusal_stops_the_client_with_one_error(case, tmp_path):
    address, kwargs, code, cleanup = _refusal(case, tmp_path)
    steps = 30
    trainer = Trainer(address, f"refuse-{case}", steps, monitor_kwargs=kwargs)
    try:
        with Records("stepwatch.hooks") as records:
            trainer.start()
            assert trainer.done.wait(300) and trainer.error is None, trainer.error
    finally:
        cleanup()
    stats = trainer.stats()
    assert trainer.progress == steps - 1 and stats.get("errors", 0) == 0  # training went on
    assert stats["connect_attempts"] == 1  # never retried
    assert stats["fatal_error"].startswith(code), stats["fatal_error"]
    errors = records.messages(logging.ERROR)
    assert len(errors) == 1 and code in errors[0] and "for good" in errors[0]
    # every step after the refusal is counted, none is buffered, nothing is logged per step
    assert stats["buffered_steps"] == 0
    assert stats["dropped_stopped"] + stats.get("steps_enqueued", 0) == steps
    assert len(records.messages(logging.WARNING, "client buffer full")) == 0
