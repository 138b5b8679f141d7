"""coordinator.py without processes: global metric ids, partials taken once (a resend is a
resend, an overlap names the covered ranks, a reduced step answers late), steps reduced in
order (a later complete step forces an older one only after RESEND_GRACE_S), goodbyes finish
the run, and a restarted coordinator reloads ids and the last stored step from the store."""

from __future__ import annotations

import json
import threading

import numpy as np
import polars as pl
import pytest

from collector.coordinator import RESEND_GRACE_S, Coordinator
from collector.partials import Partial, partial_of
from store import MetricDict, RunInfo, open_store
from store.base import RawBlock, ValueBatch

INFO = RunInfo("r", world_size=4)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def names(*ns: str) -> MetricDict:
    n = len(ns)
    z = np.full(n, -1, np.int32)
    return MetricDict(
        np.arange(n, dtype=np.int32), list(ns), z, z, z, [""] * n, [""] * n, ["sum"] * n
    )


def part(step: int, ranks: set[int], value: float = 1.0) -> Partial:
    """Ranks each sent `value` for metric ids 0 and 1 (sum op)."""
    n = len(ranks)
    ids = np.array([0, 1], np.int32)
    return Partial(
        "r",
        step,
        frozenset(ranks),
        0.0,
        ids,
        np.full(2, n * value),
        np.full(2, n, np.int64),
        np.full(2, value),
        np.full(2, value),
    )


@pytest.fixture
def co(tmp_path):
    store = open_store(f"parquet:{tmp_path / 'co'}")
    clock = Clock()
    c = Coordinator(store, straggler_timeout_s=30.0, detect=False, clock=clock)
    c.register("r", INFO, names("a", "b"))
    yield c, clock, store
    store.close()


def test_names_get_one_global_id_whoever_registers_them_first(co):
    c, _, _ = co
    ids = c.register("r", INFO, names("c", "a"))  # another collector: a known name, a new one
    assert ids.tolist() == [2, 0]
    with pytest.raises(ValueError, match="other labels"):
        md = names("a")
        md.reduce[0] = "max"
        c.register("r", INFO, md)


def test_a_step_is_reduced_once_every_rank_is_covered_and_resends_are_resends(co):
    c, _, store = co
    assert c.partial(part(0, {0, 2})) == ("ok", [])
    assert c.partial(part(0, {0, 2})) == ("ok", [])  # a resend: taken once
    assert c.partial(part(0, {2, 3})) == ("overlap", [0, 2])
    assert store.steps("r").height == 0  # {0, 2} only: waits
    assert c.partial(part(0, {1, 3}, 2.0)) == ("ok", [])
    steps = store.steps("r")
    assert steps["step"].to_list() == [0] and steps["complete"].to_list() == [True]
    got = store.at_step("r", 0)
    assert got["value"].to_list() == [2 * 1.0 + 2 * 2.0] * 2  # once each: a resend added nothing
    assert c.partial(part(0, {1})) == ("late", [])  # reduced: its raw stays raw


def test_a_later_complete_step_forces_an_older_one_only_after_the_grace(co):
    c, clock, store = co
    c.partial(part(0, {0, 1}))  # step 0 lacks ranks 2, 3
    for r in ({0, 1}, {2, 3}):
        c.partial(part(1, r))  # step 1 complete
    assert store.steps("r").height == 0  # in order: 1 waits behind 0
    clock.t = RESEND_GRACE_S - 0.1
    c.tick()
    assert store.steps("r").height == 0  # an older step's copy may still come
    clock.t = RESEND_GRACE_S
    c.tick()
    steps = store.steps("r")
    assert steps["step"].to_list() == [0, 1]
    assert steps["missing_ranks"].to_list() == [[2, 3], []]


def test_a_straggler_step_is_reduced_after_the_timeout(co):
    c, clock, store = co
    c.partial(part(0, {0, 1, 2}))
    clock.t = 29.9
    c.tick()
    assert store.steps("r").height == 0
    clock.t = 30.0
    c.tick()
    assert store.steps("r")["missing_ranks"].to_list() == [[3]]


def test_a_waiting_partial_answers_once_its_step_is_stored(co):
    c, _, store = co
    got: list = []
    waiting = part(0, {0, 1})
    waiting.wait = True
    t = threading.Thread(target=lambda: got.append(c.partial(waiting)))
    t.start()
    t.join(0.3)
    assert t.is_alive() and not got  # the step lacks ranks 2, 3
    c.partial(part(0, {2, 3}))
    t.join(10)
    assert got == [("ok", [])] and store.steps("r").height == 1


def test_the_run_finishes_once_every_rank_said_goodbye(co):
    c, _, store = co
    c.partial(part(0, {0, 1}))
    c.finish_ranks("r", [0, 1], "finished")
    assert store.runs().filter(run="r")["status"].to_list() == ["live"]
    c.finish_ranks("r", [2, 3], "finished")
    assert store.runs().filter(run="r")["status"].to_list() == ["finished"]
    assert store.steps("r")["missing_ranks"].to_list() == [[2, 3]]  # pending: reduced


def test_a_restarted_coordinator_keeps_ids_and_never_reduces_a_stored_step_again(tmp_path):
    url = f"parquet:{tmp_path / 'co'}"
    with open_store(url) as store:
        c = Coordinator(store, detect=False, clock=Clock())
        c.register("r", INFO, names("a", "b"))
        for r in ({0, 1}, {2, 3}):
            c.partial(part(0, r))
    with open_store(url) as store:
        c = Coordinator(store, detect=False, clock=Clock())
        assert c.partial(part(0, {0, 1})) == ("late", [])  # stored before the restart
        assert c.register("r", INFO, names("b", "z")).tolist() == [1, 2]
        for r in ({0, 1}, {2, 3}):
            c.partial(part(1, r))
        assert store.steps("r")["step"].to_list() == [0, 1]


def test_a_restarted_coordinator_goes_on_from_the_stored_clip_version(tmp_path):
    url = f"parquet:{tmp_path / 'co'}"
    with open_store(url) as store:
        c = Coordinator(store, detect=False, clock=Clock())
        c.register("r", INFO, names("a"))
        assert c.push_clip("r", [(1, "routed", 7.0)]) == 1
    with open_store(url) as store:
        c = Coordinator(store, detect=False, clock=Clock())
        c.register("r", INFO, names("a"))  # the run comes back into memory from the store
        assert c.push_clip("r", [(2, "shared", 5.0)]) == 2  # not 1: collectors hold v1
        table = c.clip_table("r")
        assert table is not None
        got = {(s.layer, s.site): s.limit for s in table.settings}
        assert got == {(1, "routed"): 7.0, (2, "shared"): 5.0}


@pytest.mark.parametrize("bad", [-1, 2])
def test_a_partial_with_an_id_the_run_never_gave_is_refused(co, bad):
    c, _, store = co
    p = part(0, {0, 1})
    p.ids = np.array([0, bad], np.int32)
    with pytest.raises(ValueError, match="outside"):
        c.partial(p)
    c.partial(part(0, {0, 1}))  # nothing of it was taken
    c.partial(part(0, {2, 3}))
    assert store.at_step("r", 0)["value"].to_list() == [4.0, 4.0]


def test_a_nan_event_names_the_rank_it_came_from(tmp_path):
    """Two collectors' partials; on step 3 rank 2's value of one expert is NaN: the
    coordinator's nonfinite event names rank 2 alone (the partials' non-finite pairs), as a
    single collector's names the rank from its raw values."""
    store = open_store(f"parquet:{tmp_path / 'co'}")
    c = Coordinator(store, observe_only=True, clock=Clock())
    sites = [f"moe/layer00/expert{e:03d}/act_rms" for e in range(4)]
    c.register("r", INFO, names(*sites))
    none = np.empty(0, np.int32)
    empty = ValueBatch(np.empty(0, np.int64), none, np.empty(0, np.float32), rank=none)
    for step in range(5):
        for group in ([0, 1], [2, 3]):
            v = np.ones((2, 4), np.float32)
            if step == 3 and 2 in group:
                v[group.index(2), 1] = np.nan
            block = RawBlock(step, np.array(group, np.int32), np.arange(4, dtype=np.int32), v)
            assert c.partial(partial_of("r", step, [block], empty, frozenset(group)))[0] == "ok"
    events = store.events("r").filter(pl.col("kind") == "nonfinite")
    assert events["step"].to_list() == [3] and events["site"].to_list() == [sites[1][:-8]]
    detail = json.loads(events["detail"][0])
    assert detail["ranks"] == [2] and detail["rank"] == 2
    store.close()
