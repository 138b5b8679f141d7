"""What the load generator stands on: `Values.steps`, one matrix per step for a group of ranks
(its senders: test_channel_sender.py)."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.workload import Values, Workload

pytestmark = pytest.mark.timeout(60)


# ---- Values.steps ------------------------------------------------------------------------------
@pytest.mark.parametrize("total, world", [(600, 4), (6_000_000, 4096), (6_000_000, 512)])
def test_steps_equal_step_row_for_row(total, world):
    """Bit for bit, before and after the dying expert and the spike start, for a rank range
    that spans several EP groups (the ingest test compares stored values with `step`)."""
    w = Workload.for_total(total, world, spike_step=3, death_step=2)
    values = Values(w)
    ranks = range(1, min(world, 70))
    assert len({w.group(r) for r in ranks}) > 1
    for s in (0, 2, 3, 7):
        block = values.steps(ranks, s)
        assert block.dtype == np.float32 and block.shape == (len(ranks), w.values_per_rank)
        np.testing.assert_array_equal(block, np.stack([values.step(r, s) for r in ranks]))


def test_steps_keep_the_spike_on_rank_0s_first_expert():
    w = Workload.for_total(600, 4, spike_step=3, death_step=2)
    values = Values(w)
    site = [s.name for s in w.specs(0)].index(w.spike_site.name)
    before, after = values.steps(range(4), 2), values.steps(range(4), 3)
    assert after[0, site] / before[0, site] > 30  # x40, less the drift and jitter
    others = np.ones(after.shape, bool)
    others[0, site] = False
    assert (after[others] / before[others]).max() < 1.1


def test_steps_need_a_rank():
    with pytest.raises(ValueError, match="at least one rank"):
        Values(Workload.for_total(600, 4)).steps([], 0)
