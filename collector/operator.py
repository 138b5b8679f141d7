"""The operator's side of the control plane: one clip command over the Telemetry stream.

An operator connection is an ordinary `Stream` RPC (so token auth and TLS apply unchanged)
whose only frame is a Hello with client_version OPERATOR_CLIENT and the command as JSON in
config_json (collector/control.parse_operator_command). The collector applies it and answers
with one ClipUpdate - the run's clip table after the command, its version, and in `reason` a
JSON object with the frozen sites - then ends the stream. No proto change was needed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import grpc

from collector.control import OPERATOR_CLIENT
from proto.v1 import telemetry_pb2 as pb
from proto.v1 import telemetry_pb2_grpc as pbg


class OperatorError(RuntimeError):
    """The collector refused the command or could not be reached; message says why."""


@dataclass
class ClipTable:
    version: int
    limits: dict[tuple[int, str], float]  # inf = off
    frozen: list[tuple[int, str]]
    observe_only: bool

    def csv(self) -> str:
        keys = sorted(set(self.limits) | set(self.frozen))
        lines = ["layer,site,limit,frozen"]
        for layer, site in keys:
            limit = self.limits.get((layer, site), math.inf)
            lines.append(f"{layer},{site},{limit:g},{str((layer, site) in self.frozen).lower()}")
        return "\n".join(lines) + "\n"


def operate(
    target: str,
    run: str,
    op: str,
    items: list | None = None,
    *,
    token: str | None = None,
    timeout_s: float = 10.0,
    credentials: grpc.ChannelCredentials | None = None,
) -> ClipTable:
    """Send one command; items are [layer, site, limit] for "set", [layer, site] otherwise."""
    key = "settings" if op == "set" else "sites"
    hello = pb.Hello(
        header=pb.FrameHeader(run=run, rank=0, step=-1, seq=0),
        world_size=1,
        protocol_version=1,
        client_version=OPERATOR_CLIENT,
        config_json=json.dumps({"op": op, key: [list(i) for i in items or ()]}),
    )
    channel = (
        grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    )
    md = [("authorization", f"Bearer {token}")] if token else []
    try:
        call = pbg.TelemetryStub(channel).Stream(
            iter([pb.ClientFrame(hello=hello)]), metadata=md, timeout=timeout_s
        )
        for frame in call:
            if frame.HasField("clip"):
                return _table(frame.clip)
            if frame.HasField("error"):
                raise OperatorError(f"{frame.error.code}: {frame.error.message}")
        raise OperatorError("the collector ended the stream without an answer")
    except grpc.RpcError as exc:
        raise OperatorError(f"{exc.code().name}: {exc.details()}") from None
    finally:
        channel.close()


def _table(update: pb.ClipUpdate) -> ClipTable:
    info = json.loads(update.reason or "{}")
    return ClipTable(
        version=update.version,
        limits={(s.layer, s.site): s.limit for s in update.settings},
        frozen=[(int(l), s) for l, s in info.get("frozen", [])],
        observe_only=bool(info.get("observe_only", False)),
    )
