"""The collector's on-disk spool: a bounded, checksummed, append-only log of store writes.

While the store is away the writer (writer.py) appends every store write to the spool instead,
and acknowledges the frames behind it once the spool has fsynced them; when the store answers
again it drains the spool into the store, oldest record first, and only then writes directly
again. This module is the log itself: its files, its records, its bound, its recovery.

    DIR/LOCK                   flock held by the one collector that uses the spool (pid inside)
    DIR/CURSOR                 "<segment> <offset>": the first record not yet in the store
    DIR/<segment:016d>.spool   records, appended; a new segment once one reaches segment_bytes
    DIR/rejected.spool         records the store refused for good (kept for an operator)

A record is a 16-byte header and a payload (jobs.py encodes the store writes):

    magic b"SWSP" | version u8 | kind u8 | flags u16 | length u32 | crc32 u32

crc32 (zlib) covers header bytes 4..12 (version, kind, flags, length) and the payload, so a
damaged length is caught as surely as damaged data.

fsync policy. `append` writes to the OS; `sync` fsyncs the segment being appended to (and the
directory, once per new segment). The writer acknowledges frames only after `sync` returned
(group commit: one fsync per flush interval, as the store gets one flush), so nothing acked is
lost to a kill -9 or a power cut. CURSOR is rewritten atomically (temp file, fsync, rename,
fsync of the directory) after the store flushed the drained records and before the segments
they lay in are deleted; a crash in between replays those records once more, which the store's
idempotent writes absorb (last write wins on every natural key).

Bound. `max_bytes` caps the segment files on disk (drained records count until their segment
is deleted); an append that would pass it, or that fails for lack of disk space (ENOSPC, the
partial record is cut off again), raises SpoolFull and writes nothing. The writer then holds
the job in memory, unacknowledged, and the collector refuses new frames (UNAVAILABLE) until
the store or the spool has room.

Recovery. Opening scans every segment from the cursor: records whose header or checksum is
wrong are skipped up to the next record that checks out, and reported (`Recovery`); a record
cut short at the end of the last segment (an append interrupted by a crash, never acked) is
truncated away. Every intact record is replayed.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from store.locks import Locked, lock_file

log = logging.getLogger("collector.spool")

MAGIC = b"SWSP"
VERSION = 1
HEADER = struct.Struct("<4sBBHII")  # magic, version, kind, flags, length, crc32
MAX_RECORD = 1 << 31  # a length beyond this is damage, not data
SEGMENT_RE = re.compile(r"^(\d{16})\.spool$")
Buffer = bytes | bytearray | memoryview


class SpoolFull(Exception):
    """The spool is at max_bytes, or the disk is full: nothing was written."""


class SpoolLocked(OSError):
    """Another collector holds the spool directory."""


@dataclass
class Recovery:
    """What opening found: intact records to replay, and what could not be read."""

    records: int = 0
    bytes: int = 0
    damaged: list[str] = field(default_factory=list)  # one line per unreadable region
    damaged_bytes: int = 0
    truncated_bytes: int = 0  # a torn last append, cut off

    def describe(self) -> str:
        text = f"{self.records} record(s), {self.bytes} bytes to replay"
        if self.damaged:
            text += f"; {self.damaged_bytes} damaged bytes skipped ({'; '.join(self.damaged)})"
        if self.truncated_bytes:
            text += f"; a torn last record of {self.truncated_bytes} bytes cut off (never acked)"
        return text


@dataclass(frozen=True)
class Record:
    segment: int
    offset: int
    end: int  # offset just past the record
    kind: int
    payload: bytes


def _crc(head: bytes, payload: Sequence[Buffer]) -> int:
    crc = zlib.crc32(head[4:12])
    for part in payload:
        crc = zlib.crc32(part, crc)
    return crc


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def scan(data: bytes, start: int = 0) -> Iterator[tuple[int, int, int, bytes] | tuple[int, int]]:
    """Records of one segment's bytes from `start`: (offset, end, kind, payload) for each one
    that checks out, (offset, end) for each damaged region in between (skipped up to the
    next record whose header and checksum are right). A record cut short by the end of the
    data is reported as a damaged region reaching the end."""
    pos, n = start, len(data)
    while pos < n:
        rec = _record_at(data, pos)
        if rec is not None:
            end, kind, payload = rec
            yield pos, end, kind, payload
            pos = end
            continue
        nxt = data.find(MAGIC, pos + 1)
        while nxt != -1 and _record_at(data, nxt) is None:
            nxt = data.find(MAGIC, nxt + 1)
        stop = n if nxt == -1 else nxt
        yield pos, stop
        pos = stop


def _record_at(data: bytes, pos: int) -> tuple[int, int, bytes] | None:
    if pos + HEADER.size > len(data):
        return None
    magic, version, kind, _flags, length, crc = HEADER.unpack_from(data, pos)
    end = pos + HEADER.size + length
    if magic != MAGIC or version != VERSION or length > MAX_RECORD or end > len(data):
        return None
    payload = data[pos + HEADER.size : end]
    if _crc(data[pos : pos + HEADER.size], [payload]) != crc:
        return None
    return end, kind, payload


class Spool:
    def __init__(
        self,
        directory: str,
        *,
        max_bytes: int,
        segment_bytes: int = 64 << 20,
        lock_timeout_s: float = 0.0,
    ) -> None:
        """Open (creating) the spool in `directory`: take its lock, waiting up to
        lock_timeout_s for another collector to let go of it (SpoolLocked after that), then
        recover what an earlier collector left (`self.recovery`)."""
        self.dir = os.path.abspath(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        os.makedirs(self.dir, exist_ok=True)
        self._lock_fd = self._lock(lock_timeout_s)
        self._fd: int | None = None  # the segment being appended to
        self._tail = (0, 0)  # (segment, offset) where the next append goes
        self._unsynced = False
        self._new_segment = False  # the directory needs an fsync too
        self.recovery = Recovery()
        self._cursor = self._read_cursor()  # first record not yet in the store
        self._read = self._cursor  # first record not yet handed out by read()
        self._sizes: dict[int, int] = {}  # segment -> bytes on disk
        self._recover()

    # ---- lock ------------------------------------------------------------------------------
    def _lock(self, timeout_s: float) -> int:
        try:
            return lock_file(os.path.join(self.dir, "LOCK"), timeout_s, f"spool {self.dir}")
        except Locked as e:
            raise SpoolLocked(
                f"{e}: stop that collector, or give this one its own --spool directory"
            ) from None

    # ---- files -----------------------------------------------------------------------------
    def _path(self, segment: int) -> str:
        return os.path.join(self.dir, f"{segment:016d}.spool")

    def _segments(self) -> list[int]:
        return sorted(int(m.group(1)) for f in os.listdir(self.dir) if (m := SEGMENT_RE.match(f)))

    def _read_cursor(self) -> tuple[int, int]:
        try:
            with open(os.path.join(self.dir, "CURSOR")) as f:
                seg, off = f.read().split()
            return int(seg), int(off)
        except FileNotFoundError:
            return (0, 0)
        except (OSError, ValueError) as e:  # a damaged cursor: replay everything (idempotent)
            log.warning("spool %s: unreadable CURSOR (%s); replaying every segment", self.dir, e)
            return (0, 0)

    def _write_cursor(self, pos: tuple[int, int]) -> None:
        path = os.path.join(self.dir, "CURSOR")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{pos[0]} {pos[1]}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.dir)

    def _recover(self) -> None:
        segs = [s for s in self._segments() if s >= self._cursor[0]]
        for s in self._segments():
            if s < self._cursor[0]:  # drained before a crash, not yet deleted
                os.unlink(self._path(s))
        rec = self.recovery
        for i, seg in enumerate(segs):
            with open(self._path(seg), "rb") as f:
                data = f.read()
            start = self._cursor[1] if seg == self._cursor[0] else 0
            good_end = start
            for item in scan(data, start):
                if len(item) == 4:
                    rec.records += 1
                    rec.bytes += item[1] - item[0]
                    good_end = item[1]
                    continue
                lo, hi = item
                if i == len(segs) - 1 and hi == len(data):  # torn tail of the last append
                    rec.truncated_bytes = hi - lo
                    break
                rec.damaged.append(f"segment {seg} bytes {lo}..{hi}")
                rec.damaged_bytes += hi - lo
                good_end = hi
            if i == len(segs) - 1 and rec.truncated_bytes:
                with open(self._path(seg), "r+b") as f:
                    f.truncate(good_end)
                    os.fsync(f.fileno())
                data = data[:good_end]
            self._sizes[seg] = len(data)
        # Segment numbers only grow (a stale CURSOR must never name a newer segment than the
        # ones it would then delete as drained).
        self._tail = (segs[-1], self._sizes[segs[-1]]) if segs else (self._cursor[0], 0)
        if self._cursor[0] not in self._sizes:  # the cursor's segment is gone: start of the rest
            self._cursor = self._read = (segs[0], 0) if segs else self._tail
        if rec.damaged or rec.truncated_bytes:
            log.error("spool %s recovered: %s", self.dir, rec.describe())
        elif rec.records:
            log.warning("spool %s recovered: %s", self.dir, rec.describe())

    # ---- appends (the writer thread) -------------------------------------------------------
    @property
    def size(self) -> int:
        """Bytes of segment files on disk (what max_bytes bounds)."""
        return sum(self._sizes.values())

    def append(self, kind: int, payload: Sequence[Buffer]) -> None:
        """Append one record (payload: its parts, written without joining them). SpoolFull,
        and nothing written, if it would pass max_bytes or the disk is full."""
        length = sum(len(memoryview(p).cast("B")) for p in payload)
        need = HEADER.size + length
        if self.size + need > self.max_bytes:
            raise SpoolFull(
                f"spool {self.dir} holds {self.size} of max {self.max_bytes} bytes; "
                f"a {need}-byte record does not fit"
            )
        fd = self._segment_for(need)
        head = HEADER.pack(MAGIC, VERSION, kind, 0, length, 0)
        head = HEADER.pack(MAGIC, VERSION, kind, 0, length, _crc(head, payload))
        seg, off = self._tail
        try:
            written = os.pwritev(fd, [head, *payload], off)
            if written < need:  # a full disk writes short first, then says ENOSPC
                rest = b"".join([head, *payload])[written:]
                while rest:
                    n = os.pwrite(fd, rest, off + need - len(rest))
                    if n <= 0:
                        raise OSError(errno.ENOSPC, "no progress writing the spool")
                    rest = rest[n:]
        except OSError as e:
            os.ftruncate(fd, off)  # no partial record behind us
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(f"spool {self.dir}: disk full ({e.strerror})") from e
            raise
        self._tail = (seg, off + need)
        self._sizes[seg] = off + need
        self._unsynced = True

    def _segment_for(self, need: int) -> int:
        seg, off = self._tail
        if off > 0 and off + need > self.segment_bytes:
            self._close_fd()
            seg, off = seg + 1, 0
            self._tail = (seg, 0)
        if self._fd is None:
            self._fd = os.open(self._path(seg), os.O_WRONLY | os.O_CREAT, 0o644)
            if seg not in self._sizes:
                self._sizes[seg] = 0
                self._new_segment = True
        return self._fd

    def _close_fd(self) -> None:
        if self._fd is not None:
            if self._unsynced:
                os.fsync(self._fd)
                self._unsynced = False
            os.close(self._fd)
            self._fd = None

    def sync(self) -> None:
        """Make every appended record durable (fsync); the writer acks only after this."""
        if self._fd is not None and self._unsynced:
            os.fsync(self._fd)
        self._unsynced = False
        if self._new_segment:
            _fsync_dir(self.dir)
            self._new_segment = False

    # ---- drain (the writer thread) ---------------------------------------------------------
    @property
    def pending(self) -> bool:
        """Records not yet in the store."""
        return self._cursor < self._tail

    def read(self, max_bytes: int) -> list[Record]:
        """The next records not yet handed out, at least one if any, up to about max_bytes;
        damaged regions met on the way are skipped, logged and counted in `recovery`."""
        out: list[Record] = []
        total = 0
        while self._read < self._tail and (not out or total < max_bytes):
            seg, off = self._read
            size = self._sizes.get(seg, 0)
            if off >= size:
                later = [s for s in self._sizes if s > seg]
                if not later:
                    break
                self._read = (min(later), 0)
                continue
            with open(self._path(seg), "rb") as f:
                rec = self._record(f.fileno(), seg, off, size)
                if rec is None:  # damaged since it was written: skip to the next good record
                    lo, hi = next(iter(scan(os.pread(f.fileno(), size - off, off))))[:2]
                    self.recovery.damaged.append(f"segment {seg} bytes {off}..{off + hi}")
                    self.recovery.damaged_bytes += hi - lo
                    log.error(
                        "spool %s: damaged bytes %d..%d of segment %d skipped",
                        self.dir,
                        off,
                        off + hi,
                        seg,
                    )
                    self._read = (seg, off + hi)
                    continue
            out.append(rec)
            total += rec.end - rec.offset
            self._read = (seg, rec.end)
        return out

    @staticmethod
    def _record(fd: int, seg: int, off: int, size: int) -> Record | None:
        head = os.pread(fd, HEADER.size, off)
        if len(head) < HEADER.size:
            return None
        magic, version, kind, _flags, length, crc = HEADER.unpack(head)
        if magic != MAGIC or version != VERSION or off + HEADER.size + length > size:
            return None
        payload = os.pread(fd, length, off + HEADER.size)
        if len(payload) != length or _crc(head, [payload]) != crc:
            return None
        return Record(seg, off, off + HEADER.size + length, kind, payload)

    def rewind(self) -> None:
        """The store did not take what read() handed out: hand it out again."""
        self._read = self._cursor

    def consumed(self) -> None:
        """Everything read() handed out is in the store (flushed): move the cursor there and
        delete the segments wholly behind it; an empty spool starts afresh."""
        if self._read == self._cursor:
            return
        if self._read >= self._tail:
            self._reset()
            return
        self._write_cursor(self._read)
        self._cursor = self._read
        for seg in [s for s in self._sizes if s < self._cursor[0]]:
            os.unlink(self._path(seg))
            del self._sizes[seg]

    def _reset(self) -> None:
        """Drained to the end: every segment goes, numbering continues."""
        self.sync()
        self._close_fd()
        nxt = self._tail[0] + 1
        self._write_cursor((nxt, 0))
        for seg in list(self._sizes):
            os.unlink(self._path(seg))
        self._sizes.clear()
        self._cursor = self._read = self._tail = (nxt, 0)

    def reject(self, record: Record, why: str) -> None:
        """Keep a record the store refused for good in rejected.spool (same format)."""
        path = os.path.join(self.dir, "rejected.spool")
        head = HEADER.pack(MAGIC, VERSION, record.kind, 0, len(record.payload), 0)
        head = HEADER.pack(
            MAGIC, VERSION, record.kind, 0, len(record.payload), _crc(head, [record.payload])
        )
        with open(path, "ab") as f:
            f.write(head + record.payload)
            f.flush()
            os.fsync(f.fileno())
        log.error(
            "spool %s: the store refused a record for good (%s); kept in %s", self.dir, why, path
        )

    def close(self) -> None:
        self.sync()
        self._close_fd()
        os.close(self._lock_fd)  # drops the flock
