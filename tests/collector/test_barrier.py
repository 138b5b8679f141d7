"""barrier.py without gRPC: chunk reassembly, replace-not-add, several schemas, readiness in
order, straggler timeout on a fake clock, late ranks, and the memory bounds."""

from __future__ import annotations

import numpy as np
import pytest

from collector.barrier import BYTES_PER_VALUE, ByteBudget, StepBarrier
from collector.errors import InvalidArgument, ResourceExhausted

from .conftest import pending_steps


def f32(*xs) -> np.ndarray:
    return np.array(xs, dtype=np.float32)


def barrier(world=2, timeout=10.0, max_pending=8, budget=1 << 20) -> StepBarrier:
    return StepBarrier(
        world, straggler_timeout_s=timeout, max_pending_steps=max_pending, budget=ByteBudget(budget)
    )


def next_deadline(b: StepBarrier) -> float | None:
    """Earliest clock reading at which a straggler timeout fires, if any step waits."""
    firsts = [p.first_end for p in b._pending.values() if p.first_end is not None]
    return min(firsts) + b.straggler_timeout_s if firsts else None


def vectors(ready) -> dict[tuple[int, int], np.ndarray]:
    return {(r, sid): v[h] for r, sid, v, h in ready.parts}


def test_chunks_reassemble_by_offset_in_any_order():
    b = barrier(world=1)
    b.add_chunk(0, 0, 1, 4, 6, f32(4, 5))
    b.add_chunk(0, 0, 1, 0, 6, f32(0, 1, 2))
    b.add_chunk(0, 0, 1, 3, 6, f32(3))
    b.end_of_step(0, 0, 6, wall_time=5.0, now=0.0)
    [ready] = b.poll(now=0.0)
    np.testing.assert_array_equal(vectors(ready)[(0, 1)], f32(0, 1, 2, 3, 4, 5))
    assert ready.status.complete and ready.status.n_ranks == 1 and ready.status.wall_time == 5.0


def test_a_resent_chunk_replaces_and_is_not_counted_twice():
    b = barrier(world=1)
    b.add_chunk(0, 3, 1, 0, 4, f32(1, 2))
    b.add_chunk(0, 3, 1, 0, 4, f32(7, 8))  # resend (new values win)
    b.add_chunk(0, 3, 1, 2, 4, f32(3, 4))
    with pytest.raises(InvalidArgument, match="counts 6 values but 4 arrived"):
        b.end_of_step(0, 3, 6, 0.0, now=0.0)
    b.end_of_step(0, 3, 4, 0.0, now=0.0)
    b.end_of_step(0, 3, 4, 0.0, now=0.0)  # a resent EndOfStep is harmless
    [ready] = b.poll(0.0)
    np.testing.assert_array_equal(vectors(ready)[(0, 1)], f32(7, 8, 3, 4))


def test_several_schemas_and_ranks_wait_for_every_rank():
    b = barrier(world=2)
    b.add_chunk(0, 0, 1, 0, 2, f32(1, 2))
    b.add_chunk(0, 0, 2, 0, 3, f32(3, 4, 5))
    b.end_of_step(0, 0, 5, 0.0, now=0.0)
    assert b.poll(now=1.0) == []  # rank 1 has not ended the step
    b.add_chunk(1, 0, 9, 0, 1, f32(6))
    b.end_of_step(1, 0, 1, 0.0, now=1.0)
    [ready] = b.poll(now=1.0)
    assert set(vectors(ready)) == {(0, 1), (0, 2), (1, 9)}
    assert ready.included == {0, 1} and ready.status.missing_ranks == ()
    assert ready.nbytes == (2 + 3 + 1) * BYTES_PER_VALUE


def test_straggler_timeout_on_a_fake_clock_and_late_values():
    b = barrier(world=3, timeout=10.0)
    for rank in (0, 2):
        b.add_chunk(rank, 5, 1, 0, 1, f32(rank))
        b.end_of_step(rank, 5, 1, 0.0, now=100.0 + rank)  # first end at t=100
    b.add_chunk(1, 5, 1, 0, 1, f32(-1))  # rank 1 is mid-step
    assert b.poll(now=109.9) == []
    [ready] = b.poll(now=110.0)
    assert ready.status.missing_ranks == (1,) and not ready.status.complete
    assert ready.status.n_ranks == 2 and ready.included == {0, 2}
    assert (1, 1) in vectors(ready)  # its partial vector travels (raw only)
    # rank 1 catches up: the step is gone, its values are late, nothing changes
    assert b.is_late(5)
    assert b.add_chunk(1, 5, 1, 0, 1, f32(1)) is False
    assert b.end_of_step(1, 5, 1, 0.0, now=111.0) is False
    assert pending_steps(b) == []


def test_steps_are_reduced_in_order():
    b = barrier(world=2, timeout=10.0)
    b.end_of_step(0, 1, 0, 0.0, now=0.0)  # step 1 waits for rank 1
    b.end_of_step(0, 2, 0, 0.0, now=1.0)
    b.end_of_step(1, 2, 0, 0.0, now=2.0)  # step 2 complete first
    ready = b.poll(now=2.0)
    # rank 1 ended step 2, so it gave up on step 1: both go, 1 first and incomplete
    assert [r.step for r in ready] == [1, 2]
    assert not ready[0].status.complete and ready[1].status.complete
    assert b.reduced_through == 2


def test_a_timed_out_later_step_does_not_overtake_a_step_without_any_end():
    b = barrier(world=2, timeout=10.0)
    b.add_chunk(0, 1, 1, 0, 1, f32(1))  # step 1: data, nobody ended it
    b.end_of_step(0, 2, 0, 0.0, now=0.0)
    assert b.poll(now=5.0) == []
    assert [r.step for r in b.poll(now=10.0)] == [1, 2]
    assert next_deadline(b) is None


def test_too_far_ahead_is_resource_exhausted():
    b = barrier(world=2, max_pending=2)
    b.end_of_step(0, 0, 0, 0.0, now=0.0)
    b.end_of_step(0, 1, 0, 0.0, now=0.0)
    with pytest.raises(ResourceExhausted, match="too far ahead at step 2"):
        b.add_chunk(0, 2, 1, 0, 1, f32(1))
    with pytest.raises(ResourceExhausted):
        b.end_of_step(0, 2, 0, 0.0, now=0.0)
    b.end_of_step(1, 0, 0, 0.0, now=0.0)  # the slow rank may still catch up
    assert [r.step for r in b.poll(0.0)] == [0]
    b.end_of_step(0, 2, 0, 0.0, now=0.0)  # room again


def test_byte_budget_bounds_memory_until_released():
    budget = ByteBudget(10 * BYTES_PER_VALUE)
    b = StepBarrier(1, straggler_timeout_s=1.0, max_pending_steps=8, budget=budget)
    b.add_chunk(0, 0, 1, 0, 8, f32(1))
    with pytest.raises(ResourceExhausted, match="max_pending_bytes"):
        b.add_chunk(0, 1, 1, 0, 8, f32(1))
    assert pending_steps(b) == [0]  # the refused chunk left nothing behind
    b.add_chunk(0, 0, 1, 1, 8, f32(2))  # same vector: no new bytes
    b.end_of_step(0, 0, 2, 0.0, now=0.0)
    [ready] = b.poll(0.0)
    budget.release(ready.nbytes)
    assert budget.used == 0
    b.add_chunk(0, 1, 1, 0, 8, f32(1))


def test_new_values_after_end_of_step_are_rejected_but_identical_resends_pass():
    b = barrier(world=2)
    b.add_chunk(0, 0, 1, 0, 4, f32(1, 2))
    b.end_of_step(0, 0, 2, 0.0, now=0.0)
    b.add_chunk(0, 0, 1, 0, 4, f32(1, 2))
    with pytest.raises(InvalidArgument, match="after its EndOfStep"):
        b.add_chunk(0, 0, 1, 2, 4, f32(3))


def test_non_finite_wall_time_is_rejected():
    with pytest.raises(InvalidArgument, match="wall_time"):
        barrier().end_of_step(0, 0, 0, float("nan"), now=0.0)


def test_drain_releases_everything_pending_as_incomplete():
    b = barrier(world=2)
    b.add_chunk(0, 4, 1, 0, 1, f32(1))
    b.end_of_step(1, 3, 0, 0.0, now=0.0)
    ready = b.drain()
    assert [r.step for r in ready] == [3, 4]
    assert ready[0].status.missing_ranks == (0,) and ready[1].status.missing_ranks == (0, 1)
    assert pending_steps(b) == []


def test_tier_readiness_counts_as_the_scan_of_the_members_did():
    """A tier collector's step is ready once every rank that joined before it began has
    ended it (collector/tier.py). The barrier counts that as ranks end and rejoin; here it
    is checked against the definition, a scan of the members, after every operation of a
    random history of joins, rejoins (fail-overs back) and ends over 6 ranks and 5 steps."""
    rng = np.random.default_rng(7)
    for _ in range(40):
        b = barrier(world=6, max_pending=16)
        b.tier()
        for _ in range(60):
            rank, step = int(rng.integers(6)), int(rng.integers(5))
            if rng.random() < 0.25:
                b.join(rank)
                continue
            if rank not in b.members or b.is_late(step):
                continue
            p = b._pending.get(step)
            if p is not None and rank in p.ranks and p.ranks[rank].ended:
                continue
            b.add_chunk(rank, step, 1, 0, 1, f32(rank))
            b.end_of_step(rank, step, 1, wall_time=1.0, now=0.0)
            for q in b._pending.values():
                waits = [r for r, j in b.members.items() if j <= q.born]
                scan = all(r in q.ranks and q.ranks[r].ended for r in waits) and q.n_ended > 0
                assert b._all_ended(q) == scan, (q.step, b.members, q.born)
            b.poll(now=0.0)


def test_a_whole_vector_is_kept_as_received_and_copied_only_if_sent_again():
    b = barrier(world=2)
    sent = [np.frombuffer(f32(r, r + 1, r + 2).tobytes(), "<f4") for r in (0, 1)]  # read-only
    for r in (0, 1):
        b.add_chunk(r, 0, 1, 0, 3, sent[r])
    b.add_chunk(1, 0, 1, 1, 3, f32(7, 8))  # rank 1 sends positions 1-2 again: new values win
    for r in (0, 1):
        b.end_of_step(r, 0, 3, 0.0, now=0.0)
    [ready] = b.poll(0.0)
    (_, _, v0, h0), (_, _, v1, h1) = sorted(ready.parts, key=lambda p: p[0])
    assert v0 is sent[0] and h0.all() and not h0.flags.writeable  # no copy, no mask of its own
    np.testing.assert_array_equal(v1, f32(1, 7, 8))
    np.testing.assert_array_equal(sent[1], f32(1, 2, 3))  # what was received is left as it was
    assert h1.all() and h1.flags.writeable


class ScanEveryPoll(StepBarrier):
    """The definition poll()'s short-cut must agree with: every pending step scanned."""

    def poll(self, now: float):
        self._maybe_ready = True
        return super().poll(now)


def test_polls_that_skip_the_scan_release_what_a_full_scan_releases():
    """A random history of chunks, ends, joins (tier mode) and polls at a moving clock with
    straggler timeouts, fed to the barrier and to one that scans every pending step at every
    poll: the same steps leave, at the same polls, with the same status."""
    rng = np.random.default_rng(11)
    for trial in range(60):
        tier = trial % 3 == 0
        made = [
            cls(4, straggler_timeout_s=3.0, max_pending_steps=64, budget=ByteBudget(1 << 20))
            for cls in (StepBarrier, ScanEveryPoll)
        ]
        if tier:
            for b in made:
                b.tier()
                for r in range(4):
                    b.join(r)
        now, ended = 0.0, set()
        for _ in range(80):
            now += float(rng.choice([0.0, 0.5, 2.0]))
            op, rank, step = rng.random(), int(rng.integers(4)), int(rng.integers(6))
            if op < 0.45 and (rank, step) not in ended and not made[0].is_late(step):
                ended.add((rank, step))
                for b in made:
                    b.add_chunk(rank, step, 1, 0, 1, f32(rank))
                    b.end_of_step(rank, step, 1, 0.0, now=now)
            elif op < 0.55 and tier:
                for b in made:
                    b.join(rank)
            got, want = (
                [(r.step, r.included, r.status.complete) for r in b.poll(now)] for b in made
            )
            assert got == want, (trial, now)


def test_all_in_is_the_superset_test_against_the_expected_ranks():
    """Every subset of a world of 4, and of a tier's members {1, 3}: all_in(s) is
    s >= expected(), including ranks beyond the members."""
    import itertools

    for tier in (False, True):
        b = barrier(world=4)
        if tier:
            b.tier()
            b.join(1)
            b.join(3)
        for n in range(5):
            for s in itertools.combinations(range(4), n):
                assert b.all_in(set(s)) == (set(s) >= b.expected()), (tier, s)
    assert not b.all_in({0, 2, 5})  # as many ranks as the members, not the members
