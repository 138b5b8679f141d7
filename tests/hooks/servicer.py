"""A minimal collector for the client tests: a real gRPC server on loopback that records frames.

Not the project's collector (collector/ is built separately): just enough of the wire contract
to exercise the client. Per connection: check the token, read Hello, answer Welcome with the
durable seq, then record every frame and acknowledge cumulatively while `acking` is set. Knobs
let a test stop acking, drop the current stream, push ClipUpdates down, or say in the next
Welcome that chunks may end a step (`chunk_ends_step`) or that hole reports are taken
(`takes_dropped`), or packed schemas (`takes_packed_schema`), or a goodbye before the last acks
(`flushes_at_goodbye`, with `ack_at_goodbye` / `drop_at_goodbye` for what it does then); off:
an older collector.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent import futures

import grpc
import numpy as np

from proto.v1 import telemetry_pb2 as pb
from proto.v1 import telemetry_pb2_grpc as pbg


def wait_until(predicate, timeout: float = 10.0) -> bool:
    """Poll a condition another thread makes true (the client's own view of acks, etc.)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def header_of(frame: pb.ClientFrame) -> pb.FrameHeader:
    return getattr(frame, frame.WhichOneof("kind")).header


class RecordingServicer(pbg.TelemetryServicer):
    def __init__(self, token: str | None = None) -> None:
        self.token = token
        self.lock = threading.Condition()
        self.connections: list[list[pb.ClientFrame]] = []  # frames per connection, Hello first
        self.durable = 0  # highest contiguous seq received while acking
        self.acking = True  # advance durable on receipt
        self.send_acks = True  # tell the client (False: durable, but the ack is lost)
        self.chunk_ends_step = False  # the Welcome's capability flag
        self.takes_dropped = False  # ... and whether hole reports are taken
        self.takes_packed_schema = False  # ... and schemas in the packed form
        self.takes_mean_nonzero = False  # ... and ReduceOp REDUCE_MEAN_NONZERO
        self.flushes_at_goodbye = False  # ... and a goodbye before the last acks
        self.takes_batches = False  # ... and FrameBatch messages (recorded frame by frame)
        self.send_interval_ms = 0  # ... and the pacing it asks for
        self.messages: list[tuple[float, int]] = []  # (monotonic arrival, frames) per message
        # at a client's half-close: ack everything received (a collector's flush at goodbye),
        # or (a count) end that many such streams without acking, as a crash would
        self.ack_at_goodbye = False
        self.drop_at_goodbye = 0
        self.goodbyes = 0  # half-closes seen
        self.outboxes: list[queue.Queue] = []
        self.rejected = 0

    # -------------------------------------------------------------- test helpers
    def frames(self, kind: str | None = None) -> list[pb.ClientFrame]:
        with self.lock:
            out = [f for conn in self.connections for f in conn[1:]]
        return [f for f in out if kind is None or f.WhichOneof("kind") == kind]

    def wait_for(self, predicate, timeout: float = 10.0) -> bool:
        with self.lock:
            return self.lock.wait_for(lambda: predicate(self), timeout=timeout)

    def drop_current(self) -> None:
        """End the newest stream with UNAVAILABLE, as a collector crash would."""
        with self.lock:
            box = self.outboxes[-1]
        box.put(None)

    def push_clip(
        self, version: int, settings: list[tuple[int, str, float]], reason: str = "test"
    ) -> None:
        update = pb.ClipUpdate(
            version=version,
            reason=reason,
            settings=[pb.ClipSetting(layer=l, site=s, limit=v) for l, s, v in settings],
        )
        with self.lock:
            box = self.outboxes[-1]
        box.put(pb.ServerFrame(clip=update))

    def ended_steps(self, conn: int | None = None) -> list[tuple[int, int, float]]:
        """(step, n_values, wall_time) of every end of step received (on connection `conn`),
        in arrival order, whichever form it took: EndOfStep or a chunk with ends_step."""
        with self.lock:
            frames = [
                f
                for c in (self.connections if conn is None else [self.connections[conn]])
                for f in c[1:]
            ]
        out = []
        for f in frames:
            if f.WhichOneof("kind") == "end_of_step":
                e = f.end_of_step
                out.append((e.header.step, e.n_values, e.wall_time))
            elif f.WhichOneof("kind") == "chunk" and f.chunk.ends_step:
                c = f.chunk
                out.append((c.header.step, c.step_values, c.wall_time))
        return out

    def step_vectors(self, schema_id: int = 1) -> dict[int, np.ndarray]:
        """step -> reassembled packed vector of one schema (last copy wins)."""
        parts: dict[int, dict[int, bytes]] = {}
        totals: dict[int, int] = {}
        for f in self.frames("chunk"):
            c = f.chunk
            if c.schema_id == schema_id:
                parts.setdefault(c.header.step, {})[c.offset] = c.values
                totals[c.header.step] = c.total
        out = {}
        for step, chunks in parts.items():
            vec = np.concatenate([np.frombuffer(chunks[o], "<f4") for o in sorted(chunks)])
            assert len(vec) == totals[step]
            out[step] = vec
        return out

    # -------------------------------------------------------------- the rpc
    def Stream(self, request_iterator, context):
        metadata = dict(context.invocation_metadata())
        if self.token is not None and metadata.get("authorization") != f"Bearer {self.token}":
            with self.lock:
                self.rejected += 1
                self.lock.notify_all()
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad or missing token")
        hello = next(request_iterator)
        outbox: queue.Queue = queue.Queue()
        with self.lock:
            frames = [hello]
            self.connections.append(frames)
            self.outboxes.append(outbox)
            self.lock.notify_all()
            durable, capable = self.durable, self.chunk_ends_step
        yield pb.ServerFrame(
            welcome=pb.Welcome(
                acked_seq=durable,
                protocol_version=1,
                chunk_ends_step=capable,
                takes_dropped=self.takes_dropped,
                takes_packed_schema=self.takes_packed_schema,
                takes_mean_nonzero=self.takes_mean_nonzero,
                flushes_at_goodbye=self.flushes_at_goodbye,
                takes_batches=self.takes_batches,
                send_interval_ms=self.send_interval_ms,
            )
        )

        ended = threading.Event()
        context.add_callback(ended.set)  # the rpc terminated (a cancel does so at once)

        def read() -> None:
            try:
                for message in request_iterator:
                    inner = (
                        list(message.batch.frames)
                        if message.WhichOneof("kind") == "batch"
                        else [message]
                    )
                    with self.lock:
                        self.messages.append((time.monotonic(), len(inner)))
                        for frame in inner:
                            frames.append(frame)
                            seq = header_of(frame).seq
                            if self.acking and seq == self.durable + 1:
                                self.durable = seq
                                if self.send_acks:
                                    ack = pb.Ack(seq=seq, step=header_of(frame).step)
                                    outbox.put(pb.ServerFrame(ack=ack))
                        self.lock.notify_all()
                # gRPC's threaded server ends the request iterator the same way for a cancel
                # as for a half-close when the cancel is seen second: a cancel terminates the
                # rpc within moments, while a half-closed one lives until this side ends it.
                if ended.wait(0.25):
                    return
                with self.lock:  # the client half-closed
                    self.goodbyes += 1
                    if self.drop_at_goodbye:
                        self.drop_at_goodbye -= 1
                    elif self.ack_at_goodbye:
                        seqs = sorted(header_of(f).seq for f in frames[1:])
                        while self.durable + 1 in seqs:
                            self.durable += 1
                        outbox.put(pb.ServerFrame(ack=pb.Ack(seq=self.durable)))
                    self.lock.notify_all()
            except grpc.RpcError:
                pass
            finally:
                outbox.put(None)

        threading.Thread(target=read, daemon=True).start()
        while True:
            item = outbox.get()
            if item is None:
                break
            yield item
        if context.is_active():
            context.abort(grpc.StatusCode.UNAVAILABLE, "test server dropped the stream")


class LoopbackServer:
    """The servicer on 127.0.0.1:<free port>; `stop()` / `restart()` keep the same port."""

    def __init__(self, servicer: RecordingServicer, port: int = 0) -> None:
        self.servicer = servicer
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pbg.add_TelemetryServicer_to_server(servicer, self._server)
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        self._server.start()
        self.target = f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self._server.stop(grace=None).wait()
