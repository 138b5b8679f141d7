"""Versioned activation-clip tables, one per run, and the acks every rank sends for them.

Each push merges its settings into the run's clip table by (layer, site) and bumps the run's
version; the ClipUpdate sent down carries the WHOLE table at that version. A rank that missed
earlier versions (it reconnected, or joined late and receives only the latest) is therefore
never left with stale limits: any single update is enough. A limit <= 0 or inf turns a site
off and stays in the table, so ranks that had it on switch it off.

Each version also remembers what it changed (settings, reason, the run's step when it was
decided), so the control plane (control.py) can store it (store.ClipRecord rows) and rewrite
those rows with the step every rank acknowledged.

Thread-safe (one lock): operators and the clip policy push from any thread, the event loop
records acks.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

from collector.errors import InvalidArgument
from proto.v1 import telemetry_pb2 as pb
from store.base import RUN_NAME_RE, ClipRecord

SITES = ("routed", "shared")
KEEP_VERSIONS = 64  # acks are kept for this many most recent versions per run


@dataclass(frozen=True)
class ClipAckRecord:
    rank: int
    version: int
    step: int  # first step the rank trained with this version


@dataclass
class _RunClips:
    version: int = 0
    table: dict[tuple[int, str], float] = field(default_factory=dict)
    latest: pb.ClipUpdate | None = None
    acks: dict[tuple[int, int], int] = field(default_factory=dict)  # (rank, version) -> step
    changes: dict[int, tuple[list, str, int]] = field(default_factory=dict)  # version -> what


def check_setting(s) -> tuple[int, str, float]:
    """A (layer, site, limit) setting, its limit as a float; InvalidArgument says what is off."""
    try:
        layer, site, limit = s
    except (TypeError, ValueError):
        raise InvalidArgument(f"a clip setting is (layer, site, limit), got {s!r}") from None
    if not isinstance(layer, int) or isinstance(layer, bool) or layer < 0:
        raise InvalidArgument(f"clip layer must be an integer >= 0, got {layer!r}")
    if site not in SITES:
        raise InvalidArgument(f"clip site must be one of {SITES}, got {site!r}")
    if not isinstance(limit, (int, float)) or math.isnan(limit):
        raise InvalidArgument(f"clip limit must be a number (<= 0 or inf = off), got {limit!r}")
    return layer, site, float(limit)


class ClipBoard:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, _RunClips] = {}

    def push(self, run: str, settings: Iterable, reason: str, step: int = 0) -> pb.ClipUpdate:
        """Merge settings into the run's table; returns the update to send (its version).
        `step`: the run's step the update was decided at (the causing event's step)."""
        if not isinstance(run, str) or not RUN_NAME_RE.match(run):
            raise InvalidArgument(f"run name {run!r} must match {RUN_NAME_RE.pattern}")
        if not isinstance(reason, str):
            raise InvalidArgument(f"reason must be a string, got {reason!r}")
        checked = [check_setting(s) for s in settings]
        if not checked:
            raise InvalidArgument("push_clip needs at least one (layer, site, limit) setting")
        with self._lock:
            rc = self._runs.setdefault(run, _RunClips())
            for layer, site, limit in checked:
                rc.table[(layer, site)] = limit
            rc.version += 1
            rc.latest = pb.ClipUpdate(
                version=rc.version,
                reason=reason,
                settings=[
                    pb.ClipSetting(layer=layer, site=site, limit=limit)
                    for (layer, site), limit in sorted(rc.table.items())
                ],
            )
            oldest = rc.version - KEEP_VERSIONS
            rc.acks = {k: v for k, v in rc.acks.items() if k[1] > oldest}
            rc.changes[rc.version] = (checked, reason, max(0, int(step)))
            rc.changes = {v: c for v, c in rc.changes.items() if v > oldest}
            return rc.latest

    def adopt(self, run: str, update: pb.ClipUpdate) -> bool:
        """Take another board's update as this run's latest (a tier collector mirrors its
        coordinator's table, tier.py); False if it is not newer than what is held."""
        with self._lock:
            rc = self._runs.setdefault(run, _RunClips())
            if update.version <= rc.version:
                return False
            rc.version, rc.latest = update.version, update
            rc.table = {(s.layer, s.site): s.limit for s in update.settings}
            return True

    def adopt_stored(self, run: str, clips) -> bool:
        """The run's clip table as a store holds it (store.clips: a polars frame), so a
        restarted process's versions go on from the last stored one (ranks ignore a version
        that is not newer than the one they hold); False if nothing newer was stored."""
        if not clips.height:
            return False
        table: dict[tuple[int, str], float] = {}
        for r in clips.sort("version").iter_rows(named=True):
            table[(int(r["layer"]), r["site"])] = float(r["limit"])
        settings = [
            pb.ClipSetting(layer=la, site=si, limit=li) for (la, si), li in sorted(table.items())
        ]
        version = int(clips["version"].max())
        return self.adopt(run, pb.ClipUpdate(version=version, reason="reloaded", settings=settings))

    def latest(self, run: str) -> pb.ClipUpdate | None:
        with self._lock:
            rc = self._runs.get(run)
            return rc.latest if rc else None

    def record_ack(self, run: str, rank: int, version: int, step: int) -> None:
        with self._lock:
            rc = self._runs.get(run)
            top = rc.version if rc else 0
            if rc is None or not 1 <= version <= top:
                raise InvalidArgument(
                    f"ClipAck for version {version}, but run {run!r} has clip versions 1..{top}"
                )
            if version > rc.version - KEEP_VERSIONS:
                rc.acks[(rank, version)] = step  # a resent ack replaces, never adds

    def change(self, run: str, version: int) -> tuple[list, str, int, int] | None:
        """(settings, reason, step, acked_step) of one version; acked_step is the latest step
        any rank acknowledged it with (-1: none yet). None once the version is forgotten."""
        with self._lock:
            rc = self._runs.get(run)
            ch = rc.changes.get(version) if rc else None
            if rc is None or ch is None:
                return None
            acked = [s for (_, v), s in rc.acks.items() if v == version]
            return ch[0], ch[1], ch[2], max(acked, default=-1)

    def records(self, run: str, version: int) -> list[ClipRecord]:
        """One version's store rows (one per setting it changed, with its acked step); [] once
        the version is forgotten."""
        change = self.change(run, version)
        if change is None:
            return []
        settings, reason, step, acked = change
        return [
            ClipRecord(
                version=version,
                step=step,
                layer=layer,
                site=site,
                limit=limit,
                reason=reason,
                acked_step=acked,
            )
            for layer, site, limit in settings
        ]

    def table(self, run: str) -> tuple[int, dict[tuple[int, str], float]]:
        """(version, current table) of a run; (0, {}) before any push."""
        with self._lock:
            rc = self._runs.get(run)
            return (rc.version, dict(rc.table)) if rc else (0, {})

    def acks(self, run: str) -> list[ClipAckRecord]:
        """Every recorded ack of the run, by version then rank."""
        with self._lock:
            rc = self._runs.get(run)
            items = sorted(rc.acks.items(), key=lambda kv: (kv[0][1], kv[0][0])) if rc else []
        return [ClipAckRecord(rank=r, version=v, step=s) for (r, v), s in items]
