"""Protocol trust: the rules a data frame's seq and step must follow, checked before it applies.

seq (per (run, rank), proto/v1/telemetry.proto): the client numbers every data frame from 1,
one more per frame, and resends after a reconnect exactly what was not acknowledged. Let M be
the highest seq this collector has received for the rank and A its cumulative ack. Then:

    seq == M + 1          the next frame: applied
    A < seq <= M          a resend of a frame received but not yet durable: applied again,
                          idempotently (the barrier replaces, the store's writes are keyed)
    seq <= A              a duplicate of a durable frame: ignored, and acked again
    seq > M + 1           a gap. Refused (INVALID_ARGUMENT), never acked: the frames in
                          between would be acknowledged without ever having arrived. One
                          exception, the resume point: a stream's first frame other than a
                          Schema may start above M + 1. That is a client resuming above frames
                          an earlier collector acknowledged (this one restarted, or evicted
                          the run), or frames its own buffer policy dropped; the seqs skipped
                          are counted (`frames_skipped`) and logged, and the stream must be
                          contiguous from there. (Schemas re-sent before it may jump too.)
    rewind                within one stream, a frame other than a Schema whose seq is below
                          the stream's previous such frame is refused (INVALID_ARGUMENT); the
                          same seq again is a resend. Schemas keep the seq they were first sent
                          with and are re-sent at the start of every stream: they are exempt.

step: a data frame's step must be >= 0 and at most `max_step_ahead` beyond the run's latest
step (the highest any rank has sent to this collector; a run's first step is free). A wild step
would otherwise open, once reduced, a frontier behind which every real step is "late" (stored
raw, never reduced, invisible to the detectors).

identity (run, rank): one client streams it at a time. Every Hello carries the client's session
(random per client process, hooks/frames.py). A Hello whose session matches the open stream's
takes over (the old stream ends ABORTED: a reconnect that overtook its own dead stream); any
other Hello for an identity with an open stream is refused with ALREADY_EXISTS: a second job
started with the same run name, never interleaved with the first. Once the first job's
streams are gone, a new session may rejoin (a restarted job); its Welcome says acked_seq = M,
so its frames start above every seq the rank has used.
"""

from __future__ import annotations

from collector.acks import RankAcks
from collector.conn import Conn
from collector.errors import InvalidArgument


def check_seq(conn: Conn, acks: RankAcks, kind: str, seq: int) -> int:
    """Check `seq` of a `kind` frame on `conn` against the rules above; returns how many seqs
    a resume point skips (0 almost always). Raises InvalidArgument for a gap or a rewind.
    Changes nothing (the caller applies the frame, then `acks` and `conn` move on)."""
    if kind != "schema" and seq < conn.last_seq:
        raise InvalidArgument(
            f"seq {seq} after seq {conn.last_seq} on the same stream: seqs never go back "
            "within a stream (a rewind is refused, not acknowledged)"
        )
    if seq <= acks.max_seq + 1:
        return 0
    if conn.last_seq == 0:  # nothing but Schemas on this stream yet: its resume point
        return seq - acks.max_seq - 1
    raise InvalidArgument(
        f"seq gap: seq {seq} follows seq {acks.max_seq} for rank {conn.rank} of run "
        f"{conn.run!r}; frames {acks.max_seq + 1}..{seq - 1} never arrived, and the collector "
        "acknowledges nothing it has not received"
    )


def check_step(latest: int, step: int, max_ahead: int, kind: str) -> None:
    """The step window: InvalidArgument for a step < 0 or beyond latest + max_ahead."""
    if step < 0:
        raise InvalidArgument(f"{kind} step must be >= 0, got {step}")
    if latest >= 0 and step > latest + max_ahead:
        raise InvalidArgument(
            f"{kind} step {step} lies {step - latest} steps beyond the run's latest step "
            f"{latest} (max_step_ahead={max_ahead}); refused, so that one wild step cannot "
            "make every later step late"
        )
