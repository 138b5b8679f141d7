"""Operator clip commands over the Telemetry stream: the command and its answer, both ends.

An operator connection is an ordinary `Stream` RPC (so token auth and TLS apply unchanged)
whose only frame is a Hello with client_version OPERATOR_CLIENT and the command as JSON in
config_json. The collector parses it (`parse_operator_command`), applies it (control.py) and
answers with one ClipUpdate (`operator_answer`) - the run's clip table after the command, its
version, and in `reason` a JSON object with the frozen sites - then ends the stream. `operate`
is the client: it sends one command and reads the answer back as a ClipTable. No proto change
was needed.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from collector.clipboard import ClipBoard, check_setting
from collector.errors import InvalidArgument
from proto.v1 import telemetry_pb2 as pb
from proto.v1 import telemetry_pb2_grpc as pbg
from store.base import RUN_NAME_RE

if TYPE_CHECKING:
    from collector.detect import Detect

log = logging.getLogger("collector.control")
OPERATOR_CLIENT = "stepwatch-operator/1"  # Hello.client_version of an operator stream
OPERATOR_OPS = ("list", "set", "clear", "freeze", "unfreeze")


# ---- the command and its answer (collector side) ----------------------------------------------
def parse_operator_command(config_json: str) -> tuple[str, list]:
    """An operator stream's command (its Hello.config_json) -> (op, items):

    {"op": "list"}
    {"op": "set",      "settings": [[layer, "routed"|"shared", limit], ...]}
    {"op": "clear" | "freeze" | "unfreeze", "sites": [[layer, "routed"|"shared"], ...]}
    """
    try:
        cmd = json.loads(config_json or "{}")
    except ValueError as exc:
        raise InvalidArgument(f"operator command is not JSON: {exc}") from None
    op = cmd.get("op") if isinstance(cmd, dict) else None
    if op not in OPERATOR_OPS:
        raise InvalidArgument(f"operator op must be one of {OPERATOR_OPS}, got {op!r}")
    if op == "list":
        return op, []
    items: list[tuple[int, str, float]] | list[tuple[int, str]]
    if op == "set":
        items = [
            check_setting(tuple(s) if isinstance(s, list) else s) for s in cmd.get("settings") or ()
        ]
        for layer, site, limit in items:
            if not (limit > 0 and math.isfinite(limit)):
                raise InvalidArgument(
                    f"operator set needs a finite limit > 0 for layer "
                    f"{layer} {site} (use clear to switch a clamp off)"
                )
    else:
        items = [
            check_setting((*s, math.inf) if isinstance(s, (list, tuple)) else s)[:2]
            for s in cmd.get("sites") or ()
        ]
    if not items:
        raise InvalidArgument(f"operator {op} needs at least one site")
    return op, items


def operator_answer(
    op: str,
    version: int,
    table: dict[tuple[int, str], float],
    frozen: list[tuple[int, str]],
    observe_only: bool,
) -> pb.ClipUpdate:
    """The answer to a command: the run's table at `version`; the reason is JSON with the op,
    the frozen sites and whether the collector is observe-only."""
    return pb.ClipUpdate(
        version=version,
        reason=json.dumps(
            {"op": op, "frozen": [list(k) for k in frozen], "observe_only": observe_only}
        ),
        settings=[pb.ClipSetting(layer=l, site=s, limit=v) for (l, s), v in sorted(table.items())],
    )


def apply_command(
    run: str,
    config_json: str,
    push: Callable[[str, list, str, int, float | None], int],
    step: int,
    clips: ClipBoard,
    detect: Detect | None,
    observe_only: bool,
) -> pb.ClipUpdate:
    """Apply one operator command to `run` and answer it: set / clear push a new table
    version (detect.PushFn `push`, decided at `step`); every op also steers the run's clip
    policy (freeze / unfreeze only that). A single collector's control plane (control.py) and
    a tier's coordinator (coordinator.py) both apply commands this way."""
    if not RUN_NAME_RE.match(run):
        raise InvalidArgument(f"run name {run!r} must match {RUN_NAME_RE.pattern}")
    op, items = parse_operator_command(config_json)
    if op == "set":
        push(run, items, "operator set", step, None)
    elif op == "clear":
        push(run, [(l, s, math.inf) for l, s in items], "operator clear", step, None)
    frozen = detect.operator(run, op, items) if detect else []
    log.info("operator %s on run %s: %s", op, run, items)
    version, table = clips.table(run)
    return operator_answer(op, version, table, frozen, observe_only)


# ---- the client -------------------------------------------------------------------------------
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
    """An answer (operator_answer) read back."""
    info = json.loads(update.reason or "{}")
    return ClipTable(
        version=update.version,
        limits={(s.layer, s.site): s.limit for s in update.settings},
        frozen=[(int(l), s) for l, s in info.get("frozen", [])],
        observe_only=bool(info.get("observe_only", False)),
    )
