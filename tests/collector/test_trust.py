"""trust.py's rules and the run lifecycle, against a real Collector on loopback: seq gaps and
rewinds refused and never acked, a resume point, the step window, one client per identity,
Hello alone stores nothing, idle runs abandoned and evicted (max_runs never exhausted by
vanished streams), the dictionary budget, rate-limited reject logs. Each test here failed
before these rules existed."""

from __future__ import annotations

import logging

import grpc

from .conftest import mdef
from .test_stream import wait_for

INVALID = grpc.StatusCode.INVALID_ARGUMENT


def steps_of(store, run: str, rank: int = 0) -> list[int]:
    return store.series(run, "x", rank=rank)["step"].to_list()


def test_a_seq_jump_is_refused_and_nothing_is_acked_that_was_not_stored(
    start_collector, client_factory
):
    """The issue's case: seq 1000 after 3, then 4..9. Before: 1000 was acked, 4..9 taken for
    duplicates of durable frames, acked, and never stored."""
    collector, addr, store = start_collector()
    c = client_factory(addr, "jump", 0, 1)
    c.schema(1, [mdef("x")])
    c.step(0, 1, [1.0])  # seqs 2, 3
    assert c.wait_ack().seq == 3
    c.seq = 999
    c.step(1, 1, [2.0])  # seq 1000 (and 1001)
    end = c.wait_end()
    assert end.code == INVALID and "seq gap: seq 1000 follows seq 3" in end.details
    assert max(a.seq for a in c.acks) == 3

    again = client_factory(addr, "jump", 0, 1, seq=3)  # 4..9 on a stream of their own
    for step in (1, 2, 3):
        again.step(step, 1, [float(step)])
    assert again.wait_ack().seq == 9
    assert steps_of(store, "jump") == [0, 1, 2, 3]
    assert store.series("jump", "x")["value"].to_list() == [1.0, 1.0, 2.0, 3.0]


def test_a_rewind_within_a_stream_is_refused(start_collector, client_factory):
    _, addr, _ = start_collector()
    c = client_factory(addr, "rewind", 0, 1)
    c.schema(1, [mdef("x")])
    c.step(0, 1, [1.0])  # 2, 3
    c.step(1, 1, [1.0])  # 4, 5
    c.wait_ack()
    c.seq = 2
    c.step(2, 1, [1.0])  # seq 3 again, for another step
    end = c.wait_end()
    assert end.code == INVALID and "seq 3 after seq 5" in end.details


def test_a_new_stream_may_resume_above_what_it_does_not_resend(start_collector, client_factory):
    """A client whose earlier frames a previous collector acknowledged (or its buffer dropped)
    resumes above them: accepted, and the skipped seqs counted."""
    collector, addr, store = start_collector()
    c = client_factory(addr, "resume", 0, 1, seq=0)
    c.schema(1, [mdef("x")])
    c.seq = 40  # the first data frame of the stream starts at 41
    c.step(7, 1, [7.0])
    assert c.wait_ack().seq == 42
    assert collector.stats()["frames_skipped"] == 39  # 2..40
    assert steps_of(store, "resume") == [7]


def test_a_step_far_beyond_the_run_is_refused_and_later_steps_stay_reduced(
    start_collector, client_factory
):
    """Before: one step of 10^12 was reduced, and every real step after it was "late": raw
    only, no reduction, the detectors blind."""
    _, addr, store = start_collector(max_step_ahead=1000)
    c = client_factory(addr, "wild", 0, 1)
    c.schema(1, [mdef("x")])
    c.step(0, 1, [1.0])
    c.step(1, 1, [1.0])
    c.wait_ack()
    c.step(10**12, 1, [5.0])
    end = c.wait_end()
    assert end.code == INVALID and "max_step_ahead=1000" in end.details
    again = client_factory(addr, "wild", 0, 1, seq=c.seq - 2)
    again.step(2, 1, [2.0])
    again.step(3, 1, [3.0])
    again.wait_ack()
    assert store.steps("wild")["step"].to_list() == [0, 1, 2, 3]
    assert store.series("wild", "x")["step"].to_list() == [0, 1, 2, 3]  # reduced, not late


def test_a_second_job_with_the_same_identity_is_refused_never_interleaved(
    start_collector, client_factory
):
    collector, addr, store = start_collector()
    first = client_factory(addr, "twice", 0, 1, session="job-a")
    first.schema(1, [mdef("x")])
    first.step(0, 1, [1.0])
    first.wait_ack()
    second = client_factory(addr, "twice", 0, 1, session="job-b")
    end = second.wait_end()
    assert end.code == grpc.StatusCode.ALREADY_EXISTS
    assert "already streaming" in end.details and "another run name" in end.details
    first.step(1, 1, [2.0])  # the first job is unharmed
    first.wait_ack()
    assert store.series("twice", "x")["value"].to_list() == [1.0, 2.0]
    assert collector.stats()["hellos_refused"] == 1

    # the same client reconnecting over its own (not yet closed) stream takes over
    takeover = client_factory(addr, "twice", 0, 1, seq=first.seq, session="job-a")
    assert takeover.expect("welcome").acked_seq == first.seq
    assert first.wait_end().code == grpc.StatusCode.ABORTED
    takeover.step(2, 1, [3.0])
    takeover.wait_ack()
    assert takeover.close().code == grpc.StatusCode.OK

    # once it is gone, another job may rejoin: its seqs start above every seq used
    later = client_factory(addr, "twice", 0, 1, session="job-c")
    assert later.expect("welcome").acked_seq == takeover.seq


def test_a_hello_alone_leaves_nothing_behind(start_collector, client_factory):
    collector, addr, store = start_collector()
    for i in range(20):
        c = client_factory(addr, f"junk{i}", 0, 1)
        c.expect("welcome")
        c.cancel()
    wait_for(lambda: collector.stats()["runs"] == 0, "the empty runs to be forgotten")
    real = client_factory(addr, "real", 0, 1)
    real.schema(1, [mdef("x")])
    real.step(0, 1, [1.0])
    real.wait_ack()
    assert store.runs()["run"].to_list() == ["real"]


def test_vanished_runs_are_abandoned_evicted_and_never_exhaust_max_runs(
    start_collector, client_factory
):
    """Before: a run whose streams were cut without goodbye stayed forever, and max_runs of
    them refused every new run. Now the longest-idle one makes room at once, and every run
    idle for run_idle_s is marked abandoned and evicted (its data stays)."""
    collector, addr, store = start_collector(max_runs=8, run_idle_s=1.0)
    for i in range(12):  # more vanished runs than max_runs
        c = client_factory(addr, f"cut{i}", 0, 1)
        c.schema(1, [mdef("x")])
        c.step(0, 1, [float(i)])
        c.wait_ack()
        c.cancel()  # killed, OOM'd, preempted: no goodbye
    live = client_factory(addr, "live", 0, 1)
    live.schema(1, [mdef("x")])
    live.step(0, 1, [1.0])
    live.wait_ack()
    wait_for(lambda: collector.stats()["runs"] == 1, "the idle runs to be evicted")
    wait_for(
        lambda: store.runs()["status"].to_list().count("abandoned") == 12, "their status stored"
    )
    runs = store.runs()
    status = dict(zip(runs["run"].to_list(), runs["status"].to_list()))
    assert status.pop("live") == "live"
    assert set(status.values()) == {"abandoned"} and len(status) == 12
    assert store.series("cut3", "x")["value"].to_list() == [3.0]  # data stays readable
    s = collector.stats()
    assert s["runs_abandoned"] == 12 and s["dictionary_bytes"] > 0

    back = client_factory(addr, "cut3", 0, 1, seq=3)  # a rank of it comes back: resumes
    back.schema(1, [mdef("x")])
    back.step(1, 1, [4.0])
    back.wait_ack()
    assert store.series("cut3", "x")["value"].to_list() == [3.0, 4.0]
    assert store.runs().filter(run="cut3")["status"].to_list() == ["live"]


def test_metric_dictionaries_are_bounded_and_released_with_their_run(
    start_collector, client_factory
):
    from collector.registry import name_bytes

    cost = sum(name_bytes(f"m/{i:05d}") for i in range(100))  # what 100 names reserve
    bound = cost * 3 // 2  # room for them, not for 100 more
    collector, addr, _ = start_collector(max_dictionary_bytes=bound, run_idle_s=0.5)
    big = client_factory(addr, "names", 0, 1)
    big.schema(1, [mdef(f"m/{i:05d}") for i in range(100)])
    big.wait_ack()
    assert collector.stats()["dictionary_bytes"] == cost
    big.schema(2, [mdef(f"n/{i:05d}") for i in range(100)])
    end = big.wait_end()
    assert end.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"max_dictionary_bytes={bound}" in end.details
    wait_for(lambda: collector.stats()["dictionary_bytes"] == 0, "the evicted run's names")
    other = client_factory(addr, "other", 0, 1)
    other.schema(1, [mdef(f"n/{i:05d}") for i in range(100)])
    other.wait_ack()


def test_rejected_frames_are_logged_at_a_bounded_rate(start_collector, client_factory, caplog):
    collector, addr, _ = start_collector(reject_log_interval_s=60.0)
    with caplog.at_level(logging.INFO, logger="collector"):
        for _ in range(50):
            bad = client_factory(addr, "bad", 0, 1, hello=False)
            bad.schema(1, [mdef("x")])  # no Hello first
            assert bad.wait_end().code == INVALID
    lines = [r for r in caplog.records if "rejected a frame" in r.getMessage()]
    assert collector.stats()["frames_rejected"] == 50 and len(lines) == 1
