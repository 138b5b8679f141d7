"""Shared pieces of the collector tests: a raw client built from the generated stubs (one rank's
stream, driven frame by frame), and a fixture that runs a real Collector on loopback."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from collector import Collector, CollectorConfig
from collector.barrier import StepBarrier
from proto.v1 import telemetry_pb2 as pb
from proto.v1 import telemetry_pb2_grpc as pbg
from store import open_store

WAIT_S = 20.0  # fail-safe for waits that normally end in milliseconds


def mdef(name: str, reduce: int = pb.REDUCE_SUM, **labels) -> pb.MetricDef:
    base = dict(layer=-1, expert=-1, head=-1, stat=name.rsplit("/", 1)[-1], unit="")
    base.update(labels)
    return pb.MetricDef(name=name, reduce=reduce, **base)


def pending_steps(barrier: StepBarrier) -> list[int]:
    """The steps waiting in a barrier, oldest first."""
    return sorted(barrier._pending)


class Ended(Exception):
    """The stream ended; .code is its gRPC status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code, self.details = code, details


class RawClient:
    """One rank's stream. Frames carry consecutive seqs unless a seq is given explicitly."""

    def __init__(
        self,
        address: str,
        run: str,
        rank: int,
        world_size: int,
        *,
        token: str | None = None,
        seq: int = 0,
        hello: bool = True,
        protocol_version: int = 1,
        credentials: grpc.ChannelCredentials | None = None,
        session: str = "",
        collectors: int = 0,
    ) -> None:
        self.run, self.rank, self.world_size = run, rank, world_size
        self.seq = seq
        self.sent: list[pb.ClientFrame] = []  # data frames, for resending
        self._held: list[pb.ClientFrame] | None = None  # inside batched(): frames held back
        self.channel = (
            grpc.secure_channel(address, credentials)
            if credentials
            else grpc.insecure_channel(address)
        )
        md = [("authorization", f"Bearer {token}")] if token else []
        self._up: queue.Queue = queue.Queue()
        self.call = pbg.TelemetryStub(self.channel).Stream(iter(self._up.get, None), metadata=md)
        self.down: queue.Queue = queue.Queue()
        self.end: Ended | None = None
        self.acks: list[pb.Ack] = []
        self.clips: list[pb.ClipUpdate] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if hello:
            self.send(
                pb.ClientFrame(
                    hello=pb.Hello(
                        header=self.header(step=-1, seq=0),
                        world_size=world_size,
                        config_json='{"test": true}',
                        protocol_version=protocol_version,
                        session=session,
                        collectors=collectors,
                    )
                )
            )

    def _read(self) -> None:
        try:
            for frame in self.call:
                self.down.put(frame)
            self.down.put(Ended(grpc.StatusCode.OK, ""))
        except grpc.RpcError as e:
            self.down.put(Ended(e.code(), e.details() or ""))

    # ---- up ----
    def header(self, step: int, seq: int | None = None) -> pb.FrameHeader:
        if seq is None:
            self.seq += 1
            seq = self.seq
        return pb.FrameHeader(run=self.run, rank=self.rank, step=step, seq=seq)

    def send(self, frame: pb.ClientFrame) -> pb.ClientFrame:
        if frame.WhichOneof("kind") != "hello":
            self.sent.append(frame)
        if self._held is not None:
            self._held.append(frame)
        else:
            self._up.put(frame)
        return frame

    @contextlib.contextmanager
    def batched(self) -> Iterator[list[pb.ClientFrame]]:
        """The frames built inside go up as one FrameBatch message at the end."""
        self._held = held = []
        try:
            yield held
        finally:
            self._held = None
            self._up.put(pb.ClientFrame(batch=pb.FrameBatch(frames=held)))

    def schema(self, schema_id: int, metrics: list[pb.MetricDef]) -> pb.ClientFrame:
        return self.send(
            pb.ClientFrame(
                schema=pb.Schema(header=self.header(-1), schema_id=schema_id, metrics=metrics)
            )
        )

    def chunk(
        self,
        step: int,
        schema_id: int,
        values,
        offset: int = 0,
        total: int | None = None,
        raw: bytes | None = None,
        ends_step: int | None = None,
        wall_time: float = 1.0e9,
    ) -> pb.ClientFrame:
        """One StepChunk; with ends_step=N it also ends the step, counting N values."""
        data = raw if raw is not None else np.asarray(values, dtype="<f4").tobytes()
        n = len(data) // 4
        end = (
            {}
            if ends_step is None
            else dict(ends_step=True, step_values=ends_step, wall_time=wall_time)
        )
        return self.send(
            pb.ClientFrame(
                chunk=pb.StepChunk(
                    header=self.header(step),
                    schema_id=schema_id,
                    offset=offset,
                    total=offset + n if total is None else total,
                    values=data,
                    **end,
                )
            )
        )

    def end_of_step(self, step: int, n_values: int, wall_time: float = 1.0e9) -> pb.ClientFrame:
        return self.send(
            pb.ClientFrame(
                end_of_step=pb.EndOfStep(
                    header=self.header(step), n_values=n_values, wall_time=wall_time
                )
            )
        )

    def step(self, step: int, schema_id: int, values, fold: bool = False) -> None:
        """A whole step of one schema in one chunk, then EndOfStep (fold: one chunk that
        ends the step, the form a collector whose Welcome says chunk_ends_step takes)."""
        values = np.asarray(values, dtype=np.float32)
        if fold:
            self.chunk(step, schema_id, values, ends_step=values.size)
            return
        self.chunk(step, schema_id, values)
        self.end_of_step(step, values.size)

    def clip_ack(self, version: int, step: int) -> pb.ClientFrame:
        return self.send(
            pb.ClientFrame(clip_ack=pb.ClipAck(header=self.header(step), version=version))
        )

    def half_close(self) -> None:
        self._up.put(None)

    def cancel(self) -> None:
        """Drop the connection abruptly (no goodbye)."""
        self.call.cancel()
        self._reader.join(WAIT_S)
        self.channel.close()

    # ---- down ----
    def next(self, timeout: float = WAIT_S):
        """The next ServerFrame; raises Ended when the stream is over."""
        if self.end is not None:
            raise self.end
        try:
            item = self.down.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"nothing from the collector within {timeout}s") from None
        if isinstance(item, Ended):
            self.end = item
            raise item
        kind = item.WhichOneof("kind")
        if kind == "ack":
            self.acks.append(item.ack)
        elif kind == "clip":
            self.clips.append(item.clip)
        return item

    def expect(self, kind: str, timeout: float = WAIT_S):
        """Skip frames until one of `kind` (acks and clips are recorded on the way)."""
        while True:
            frame = self.next(timeout)
            if frame.WhichOneof("kind") == kind:
                return getattr(frame, kind)

    def wait_ack(self, seq: int | None = None, timeout: float = WAIT_S) -> pb.Ack:
        """Until an Ack covers `seq` (default: everything sent so far)."""
        target = self.seq if seq is None else seq
        while not (self.acks and self.acks[-1].seq >= target):
            self.expect("ack", timeout)
        return self.acks[-1]

    def wait_end(self, timeout: float = WAIT_S) -> Ended:
        """Drain until the stream ends; returns its status."""
        while True:
            try:
                self.next(timeout)
            except Ended as e:
                return e

    def close(self) -> Ended:
        self.half_close()
        end = self.wait_end()
        self.channel.close()
        return end


@pytest.fixture
def start_collector():
    """start_collector(store=None, **config) -> (collector, "127.0.0.1:PORT", store). Without
    a token it is explicitly insecure (loopback, no auth)."""
    started: list[Collector] = []

    def start(store=None, **config):
        store = store if store is not None else open_store("memory:")
        config.setdefault("flush_interval_s", 0.05)
        config.setdefault("insecure", config.get("token") is None)
        collector = Collector(store, CollectorConfig(**config))
        port = collector.start("127.0.0.1", 0)
        started.append(collector)
        return collector, f"127.0.0.1:{port}", store

    yield start
    for c in started:
        c.stop()


@pytest.fixture
def client_factory():
    clients: list[RawClient] = []

    def make(*args, **kwargs) -> RawClient:
        c = RawClient(*args, **kwargs)
        clients.append(c)
        return c

    yield make
    for c in clients:
        c.call.cancel()
        c.channel.close()
