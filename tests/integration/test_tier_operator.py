"""An operator's clip command through a tier collector never stalls that collector's ranks.

A real `python -m collector serve --coordinator` process in front of a coordinator served in
this process (tierwire.CoordinatorServer over a real Coordinator and Parquet store) whose
Operate handler is held until the test lets it go: a slow coordinator, as far as operator
commands go, and a healthy one for the ranks' partials.

  outstanding  while `collector clip set` is waiting on the coordinator, a rank streams five
               more steps and each one is acked; the operator's answer comes once the
               coordinator answers;
  timeout      a coordinator that does not answer within tier.OPERATE_TIMEOUT_S: the
               operator gets UNAVAILABLE saying so (and that the command may still be
               applied: once the coordinator goes on, `clip list` shows it), and the rank's
               frames were acked all along.
"""

from __future__ import annotations

import threading

import pytest

from collector.coordinator import Coordinator
from collector.operator import OperatorError, operate
from collector.process import start_collector, stop_collector, terminate
from collector.tier import OPERATE_TIMEOUT_S
from collector.tierwire import CoordinatorServer
from proto.v1 import telemetry_pb2 as pb
from store import open_store
from tests.collector.conftest import RawClient, mdef

pytestmark = pytest.mark.timeout(300)
RUN = "opslow"
LIMIT = [[1, "routed", 5.0]]


class HeldOperate:
    """CoordinatorServer._on_operate, held at its entry until `release` is set."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.entered = threading.Event()
        self.release = threading.Event()
        self.answered = threading.Event()  # the coordinator applied the command it held

    def __call__(self, request: bytes) -> bytes:
        self.entered.set()
        self.release.wait(120)
        try:
            return self.inner(request)
        finally:
            self.answered.set()


@pytest.fixture
def slow_tier(tmp_path):
    """(tier collector address, HeldOperate); a rank of RUN has stored step 0."""
    store = open_store(f"parquet:{tmp_path / 'co'}")
    server = CoordinatorServer(Coordinator(store))
    held = server._on_operate = HeldOperate(server._on_operate)  # before start(): its handler
    port = server.start("127.0.0.1", 0)
    proc, address = start_collector(
        f"parquet:{tmp_path / 'w0'}",
        "--insecure",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--flush-interval",
        "0.05",
        log_path=tmp_path / "w0.log",
    )
    rank = RawClient(address, RUN, 0, 1)
    try:
        rank.expect("welcome")
        rank.schema(1, [mdef("train/loss", pb.REDUCE_MEAN)])
        rank.step(0, 1, [0.5], fold=True)
        rank.wait_ack()  # step 0 reduced and stored at the coordinator: the run is there
        yield address, held, rank
    finally:
        held.release.set()
        rank.channel.close()
        stop_collector(proc)
        terminate(proc)
        server.stop()
        store.close()


class Operator(threading.Thread):
    """`collector clip set` in a thread: its table or its OperatorError."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.address = address
        self.table = None
        self.error: OperatorError | None = None

    def run(self) -> None:
        try:  # the client's own deadline well past the collector's forward timeout
            self.table = operate(self.address, RUN, "set", LIMIT, timeout_s=60)
        except OperatorError as exc:
            self.error = exc


def stream_steps_while_outstanding(rank: RawClient, op: Operator, steps: range) -> None:
    """Each step acked while the operator still waits: the forward never held the loop."""
    for step in steps:
        rank.step(step, 1, [float(step)], fold=True)
        ack = rank.wait_ack()
        assert ack.step == step  # durable through this step (stored at the coordinator)
        assert op.is_alive(), f"the operator's command ended before step {step}'s ack"


def test_frames_are_acked_while_a_forward_is_outstanding(slow_tier):
    address, held, rank = slow_tier
    op = Operator(address)
    op.start()
    assert held.entered.wait(30), (op.error, op.table)  # at the coordinator, unanswered
    stream_steps_while_outstanding(rank, op, range(1, 6))
    held.release.set()
    op.join(30)
    assert op.error is None, op.error
    assert op.table.version == 1 and op.table.limits == {(1, "routed"): 5.0}
    rank.step(6, 1, [6.0], fold=True)
    clip = rank.expect("clip")  # the new table reaches the rank with the next answer
    assert clip.version == 1
    assert rank.close().code.name == "OK"


def test_a_coordinator_that_does_not_answer_is_a_clear_error_to_the_operator(slow_tier):
    address, held, rank = slow_tier
    op = Operator(address)
    op.start()
    assert held.entered.wait(30)
    stream_steps_while_outstanding(rank, op, range(1, 4))
    op.join(OPERATE_TIMEOUT_S + 30)
    assert not op.is_alive() and op.table is None
    message = str(op.error)
    assert message.startswith("UNAVAILABLE: ")
    assert f"did not answer the clip command within {OPERATE_TIMEOUT_S:g} s" in message
    assert "may still apply it" in message
    rank.step(4, 1, [4.0], fold=True)  # and the rank goes on as before
    assert rank.wait_ack().step == 4
    held.release.set()  # the coordinator goes on: the command it held is applied after all
    assert held.answered.wait(30)
    listed = operate(address, RUN, "list")
    assert (listed.version, listed.limits) == (1, {(1, "routed"): 5.0})
