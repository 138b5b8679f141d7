"""A tier's address list on the client: validated entry by entry; rank r starts at entry
r % K and moves to the next one after every connection that failed or ended."""

from __future__ import annotations

import pytest

from hooks import MonitorConfig, frames
from hooks.monitor import check_targets
from hooks.sender.core import SenderCore


def test_a_list_or_a_comma_string_becomes_one_string():
    assert check_targets("a:1") == "a:1"
    assert check_targets(["a:1", "b:2"]) == "a:1,b:2"
    assert check_targets("a:1,b:2") == "a:1,b:2"


@pytest.mark.parametrize("bad", ["a:1,", "a:1,b", "a:1,b:70000", [], ["a:1", 3]])
def test_each_entry_must_be_an_address(bad):
    with pytest.raises(ValueError, match="target"):
        check_targets(bad)


@pytest.mark.parametrize("rank", range(5))
def test_a_rank_prefers_its_collector_then_goes_round_the_list(rank):
    core = SenderCore("a:1,b:2,c:3", frames.Identity("r", rank, 5), [], MonitorConfig())
    order = [core.target]
    for _ in range(3):
        core._next_wait(None)  # the driver calls it after a connection ends
        order.append(core.target)
    first = rank % 3
    assert order == [["a:1", "b:2", "c:3"][(first + i) % 3] for i in range(4)]


def test_one_collector_stays_the_target():
    core = SenderCore("a:1", frames.Identity("r", 3, 4), [], MonitorConfig())
    core._next_wait(None)
    assert core.target == "a:1"
