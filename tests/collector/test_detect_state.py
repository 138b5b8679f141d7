"""detect.Detect across restarts, over a real store: the detectors' and clip policy's state is
saved, restored and caught up, so a restarted collector's detection equals an uninterrupted
one's (same events, same clip decisions); a step is fed once; bad state is a fresh start, said.

A "collector" here is a Detect over a store, fed the steps a synthetic run (tests/analytics)
reduces to, with the step's rows written as the collector writes them (reduced values and the
step status), so the stored run is what a restarted process would find."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from analytics.state import encode
from collector.detect import Detect
from collector.reduction import StepRows
from collector.stats import Counters
from store import open_store
from store.base import MetricDict, RunInfo, StepStatus, ValueBatch
from store.parquet import ParquetStore
from tests.analytics.synthetic import SyntheticRun, blowup, catalogue

RUN = "restart"
STEPS = 200
EMPTY_I32 = np.empty(0, np.int32)


def synthetic() -> SyntheticRun:
    """A blow-up (clamped, then relaxed once the expert recovers: the policy's state matters
    across the whole run) and a NaN: every stateful part of detection is exercised."""
    syn = SyntheticRun(seed=3, run=RUN)
    grow = blowup(2, 3, start=40)
    syn.faults.append(lambda step, v: grow(step, v) if step < 55 else None)  # then it is over
    syn.nan_at[25] = ["resid/layer01/rms", "train/loss"]
    return syn


def dictionary(syn: SyntheticRun) -> MetricDict:
    rows = catalogue()
    n = len(rows)
    return MetricDict(
        metric_id=np.arange(n, dtype=np.int32),
        name=[r[0] for r in rows],
        layer=np.array([r[1] for r in rows], np.int32),
        expert=np.array([r[2] for r in rows], np.int32),
        head=np.array([r[3] for r in rows], np.int32),
        stat=[r[4] for r in rows],
        unit=[""] * n,
        reduce=["mean"] * n,
    )


def step_rows(syn: SyntheticRun, step: int) -> StepRows:
    v = syn.values(step)
    ids = np.array([syn.index.find(n) for n in v], np.int32)
    vals = np.array(list(v.values()), np.float32)
    return StepRows(
        blocks=[],
        rest=ValueBatch(np.empty(0, np.int64), EMPTY_I32, np.empty(0, np.float32), rank=EMPTY_I32),
        reduced=ValueBatch(
            np.full(ids.size, step, np.int64), ids, vals, n_ranks=np.ones(ids.size, np.int32)
        ),
        status=StepStatus(step=step, n_ranks=1),
    )


class Collector:
    """Detect as the coordinator runs it: over the store, each step's rows stored and flushed."""

    def __init__(self, url: str, syn: SyntheticRun, pushes: list, **kw) -> None:
        self.store, self.syn, self.pushes = fast(url), syn, pushes
        self.counters = Counters()
        self.detect = Detect(self.store, self._push, self.counters, **kw)
        self.store.open_run(RunInfo(RUN, 1))
        md = dictionary(syn)
        self.store.write_metrics(RUN, md)
        self.store.flush()
        self.detect.on_metrics(RUN, md)

    def _push(self, run, settings, reason, step, origin) -> int:
        self.pushes.append((step, tuple(settings), reason))
        return len(self.pushes)

    def feed(self, steps) -> None:
        for s in steps:
            rows = step_rows(self.syn, s)
            self.detect.on_step(RUN, rows, {0}, 0.0)
            self.store.write_reduced(RUN, rows.reduced)
            self.store.write_steps(RUN, [rows.status])
            self.store.flush()

    def close(self, *, finish: bool) -> None:
        if finish:
            self.detect.on_finish(RUN)
            self.store.flush()  # the finish durable, then the put-off save
            self.detect.on_durable()
        self.store.close()


def fast(url: str) -> ParquetStore:
    """The Parquet store of `url` without fsync (atomic all the same; these tests flush a
    store per step, and the durability of a flush is not what they are about)."""
    return ParquetStore(url.removeprefix("parquet:"), fsync=False)


def outcome(events) -> list[tuple]:
    return [(e.step, e.kind, e.site, e.detail.get("decision")) for e in events]


def stored(url: str) -> list[tuple]:
    with open_store(url) as st:
        return [tuple(r) for r in st.events(RUN).select("step", "kind", "site").rows()]


@pytest.fixture
def reference(tmp_path) -> dict:
    """One uninterrupted run: its events (online and stored) and clip decisions."""
    url, pushes = f"parquet:{tmp_path / 'uninterrupted'}", []
    c = Collector(url, synthetic(), pushes)
    c.feed(range(STEPS))
    events = c.detect.events(RUN)
    c.close(finish=True)
    assert any(d[1][0][2] < float("inf") for d in pushes), "the run must clamp"
    assert any(d[1][0][2] == float("inf") for d in pushes), "... and relax"
    return {"events": outcome(events), "pushes": pushes, "stored": stored(url)}


@pytest.mark.parametrize(
    "stop_at, finish",
    [
        (47, True),  # stopped cleanly (SIGTERM: the run's FinishRun saves the state) mid blow-up
        (47, False),  # killed -9 after step 47: state saved at 39, steps 40-47 replayed
        (95, False),  # killed while the clamp is held: saved at 79, 80-95 replayed
    ],
)
def test_detection_after_a_restart_equals_the_uninterrupted_run(
    tmp_path, reference, stop_at, finish
):
    url, pushes = f"parquet:{tmp_path / 'restarted'}", []
    syn = synthetic()
    first = Collector(url, syn, pushes, state_every=20)
    first.feed(range(stop_at + 1))
    before = first.detect.events(RUN)
    first.close(finish=finish)
    second = Collector(url, syn, pushes, state_every=20)  # a new process, the same store
    assert second.counters.snapshot()["detector_states_restored"] == 1
    second.feed(range(stop_at + 1, STEPS))
    after = second.detect.events(RUN)
    replayed = second.counters.snapshot().get("steps_replayed", 0)
    second.close(finish=True)
    assert replayed == (0 if finish else stop_at - ((stop_at + 1) // 20 * 20 - 1))
    assert outcome(before) + outcome(after) == reference["events"]
    assert pushes == reference["pushes"]  # the same clamps and relaxations, once each
    assert stored(url) == reference["stored"]


def test_without_the_saved_state_a_restart_is_not_the_same_run(tmp_path, reference):
    """The control for the test above: the same restart with the saved state removed gives
    other detection (the restored state is what makes it equal)."""
    url, pushes = f"parquet:{tmp_path / 'fresh'}", []
    syn = synthetic()
    first = Collector(url, syn, pushes)
    first.feed(range(48))
    events = outcome(first.detect.events(RUN))
    first.close(finish=False)  # never saved: state_every is 50
    second = Collector(url, syn, pushes)
    assert second.counters.snapshot()["detector_states_restored"] == 0
    second.feed(range(48, STEPS))
    events += outcome(second.detect.events(RUN))
    second.close(finish=True)
    assert (events, pushes) != (reference["events"], reference["pushes"])


def test_a_step_is_fed_once(tmp_path):
    """A resend re-reduced after a restart, or a coordinator's retry while its store is away:
    the step does not reach the detectors or the policy again, nothing is stored twice."""
    url, pushes = f"parquet:{tmp_path / 'once'}", []
    syn = synthetic()
    c = Collector(url, syn, pushes)
    c.feed(range(60))
    n_events, n_pushes = len(c.detect.events(RUN)), len(pushes)
    assert n_pushes >= 1  # the clamp of the blow-up
    for s in (25, 50, 59):  # the NaN step, the clamp's step, the last one
        c.detect.on_step(RUN, step_rows(syn, s), {0}, 0.0)
    assert len(c.detect.events(RUN)) == n_events and len(pushes) == n_pushes
    assert c.counters.snapshot()["steps_detected_again"] == 3
    c.feed(range(60, 80))  # and the run goes on as before
    c.close(finish=True)


@pytest.mark.parametrize(
    "blob, says",
    [
        (b"garbage", "no SWDS header"),
        (encode({"step": 30, "detectors": {}, "policy": {}})[:-7], "damaged"),
        (encode({"step": 30, "detectors": {"detectors": {}}, "policy": {}}), "lacks detectors"),
        (encode({"step": 29, "detectors": {}, "policy": {}}), "stored as step 30"),
    ],
)
def test_bad_saved_state_is_a_fresh_start_said_once(tmp_path, caplog, blob, says):
    url = f"parquet:{tmp_path / 'bad'}"
    with open_store(url) as st:
        st.open_run(RunInfo(RUN, 1))
        st.write_detector_state(RUN, 30, blob)
    pushes: list = []
    with caplog.at_level(logging.ERROR, logger="collector.detect"):
        c = Collector(url, synthetic(), pushes)
    msgs = [r.getMessage() for r in caplog.records if "unusable" in r.getMessage()]
    assert len(msgs) == 1 and says in msgs[0] and "starts afresh" in msgs[0], msgs
    assert c.counters.snapshot()["detector_state_refused"] == 1
    c.feed(range(60))  # detection runs, from step 0
    assert any(e.kind == "nonfinite" and e.step == 25 for e in c.detect.events(RUN))
    assert pushes  # and the blow-up is clamped
    c.close(finish=True)


# ---- the coordinator's reload path ----------------------------------------------------------
def coordinator_run(url: str, syn: SyntheticRun, steps, *, end: bool):
    """A Coordinator (world 1) over `url` fed `steps` as partials; returns it (its store open
    until `end`, which finishes the run and closes the store)."""
    from collector.coordinator import Coordinator
    from collector.partials import Partial

    store = fast(url)
    co = Coordinator(store)
    co.register(RUN, RunInfo(RUN, 1), dictionary(syn))
    for s in steps:
        v = syn.values(s)
        ids = np.array([syn.index.find(n) for n in v], np.int32)
        order = np.argsort(ids)
        ids = ids[order]
        vals = np.array(list(v.values()), np.float64)[order]
        ones = np.ones(ids.size, np.int64)
        co.partial(Partial(RUN, s, frozenset({0}), 0.0, ids, vals, ones, vals, vals))
    if end:
        co.finish_ranks(RUN, [0], "finished")
        store.close()
    return co, store


def coordinator_outcome(url: str) -> tuple[list, list]:
    with open_store(url) as st:
        events = st.events(RUN).select("step", "kind", "site", "detail").rows()
        clips = st.clips(RUN).select("version", "step", "layer", "site", "limit").rows()
    return events, clips


def test_a_restarted_coordinator_detects_as_one_that_was_not(tmp_path):
    """Killed at step 95 (the clamp in force, its state saved at 49): the new coordinator
    reloads the run from the store - dictionary, clip table, detector state, steps 50-95
    replayed - and its events and clip rows equal an uninterrupted coordinator's."""
    ref_url, url = f"parquet:{tmp_path / 'ref'}", f"parquet:{tmp_path / 'restarted'}"
    coordinator_run(ref_url, synthetic(), range(STEPS), end=True)
    syn = synthetic()  # the same values again, drawn in the same order
    first, store = coordinator_run(url, syn, range(96), end=False)
    store.close()  # the coordinator flushed every step it reduced; nothing else is kept
    second, _ = coordinator_run(url, syn, range(96, STEPS), end=True)
    counters = second.counters.snapshot()
    assert (counters["detector_states_restored"], counters["steps_replayed"]) == (1, 46)
    ref = coordinator_outcome(ref_url)
    assert [c[4] for c in ref[1]] == [ref[1][0][4], float("inf")]  # clamped, then relaxed
    assert coordinator_outcome(url) == ref


def test_a_step_the_coordinator_retries_while_its_store_is_away_is_detected_once(tmp_path):
    syn = synthetic()
    co, store = coordinator_run(f"parquet:{tmp_path / 'away'}", syn, range(24), end=False)
    assert co.detect is not None
    real_flush, fails = store.flush, [2]

    def flaky_flush() -> None:  # the store is away for the next two flushes
        if fails[0]:
            fails[0] -= 1
            raise OSError("store away")
        real_flush()

    store.flush = flaky_flush  # type: ignore[method-assign]
    from collector.partials import Partial

    for s in (24, 25):  # step 25 holds the NaN (synthetic's nan_at)
        vals_d = syn.values(s)
        ids = np.array([syn.index.find(n) for n in vals_d], np.int32)
        order = np.argsort(ids)
        vals = np.array(list(vals_d.values()), np.float64)[order]
        p = Partial(
            RUN, s, frozenset({0}), 0.0, ids[order], vals, np.ones(ids.size, np.int64), vals, vals
        )
        for _ in range(3):  # the reduction fails with the store, and is retried by the ticker
            try:
                co.partial(p) if _ == 0 else co.tick()
                break
            except OSError:
                continue
    assert co.store.steps(RUN)["step"].to_list()[-2:] == [24, 25]
    nonfinite = [e for e in co.detect.events(RUN) if e.kind == "nonfinite"]
    assert [e.step for e in nonfinite] == [25]  # once, though step 25 was reduced twice
    assert co.counters.snapshot()["steps_detected_again"] >= 1
    store.close()


def test_a_saved_state_survives_the_spool_as_it_was():
    """While the store is away the single collector spools the state job like any other."""
    from collector import jobs

    job = jobs.WriteDetectorState(RUN, 49, encode({"step": 49, "big": np.arange(1000.0)}))
    back = jobs.decode(job.kind, b"".join(bytes(p) for p in job.encode()))
    assert back == job and job.kind == jobs.DETECTOR_STATE


def test_a_finished_runs_state_is_saved_once_its_finish_is_durable(tmp_path):
    """on_finish only marks the save (a client's close waits for the finish, and at 1 M
    metrics the state is tens of MiB); the writer's next flush (on_durable) makes it, once."""
    url, pushes = f"parquet:{tmp_path / 'finish'}", []
    c = Collector(url, synthetic(), pushes)  # state_every 50: no periodic save by step 29
    c.feed(range(30))
    c.detect.on_finish(RUN)
    assert c.counters.snapshot().get("detector_states_saved", 0) == 0
    assert c.store.detector_state(RUN) is None
    assert c.detect.on_durable() == 1
    assert c.detect.on_durable() == 0  # due once
    c.store.flush()
    step, blob = c.store.detector_state(RUN)
    assert step == 29 and blob
    c.close(finish=False)
