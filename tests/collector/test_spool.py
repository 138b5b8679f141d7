"""spool.py: checksummed records survive a crash, damage is skipped and reported, the bound
refuses instead of writing, the cursor and segments follow the drain, one collector per
directory."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from collector.spool import HEADER, Spool, SpoolFull, SpoolLocked, scan


def crash(spool: Spool) -> None:
    """What a kill -9 leaves: the files as written, no fsync, no close (the lock drops)."""
    if spool._fd is not None:
        os.close(spool._fd)
    os.close(spool._lock_fd)


def payload(i: int, size: int = 100) -> bytes:
    return (f"record {i:04d} ".encode() * size)[:size]


def fill(spool: Spool, n: int, size: int = 100) -> None:
    for i in range(n):
        spool.append(3, [payload(i, size)])
    spool.sync()


def drain(spool: Spool) -> list[bytes]:
    out = []
    while batch := spool.read(1 << 20):
        out += [r.payload for r in batch]
    spool.consumed()
    return out


def segments(d) -> list[str]:
    return sorted(f for f in os.listdir(d) if f.endswith(".spool"))


def test_records_survive_a_crash_in_order_and_the_cursor_follows_the_drain(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=1000)
    fill(s, 20)
    assert len(segments(tmp_path)) == 3  # 8 records of 116 bytes per 1000-byte segment
    first = s.read(300)  # a part of it reaches the store ...
    assert [r.payload for r in first] == [payload(i) for i in range(len(first))]
    s.consumed()
    crash(s)  # ... then the collector dies

    again = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=1000)
    assert again.recovery.records == 20 - len(first) and not again.recovery.damaged
    assert drain(again) == [payload(i) for i in range(len(first), 20)]
    assert segments(tmp_path) == [] and not again.pending  # drained: the files go
    fill(again, 2)  # numbering goes on after a reset
    crash(again)
    third = Spool(str(tmp_path), max_bytes=1 << 20, segment_bytes=1000)
    assert drain(third) == [payload(0), payload(1)]


def test_a_damaged_record_is_skipped_and_reported_every_intact_one_replayed(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20)
    fill(s, 5)
    crash(s)
    (seg,) = segments(tmp_path)
    path = tmp_path / seg
    data = bytearray(path.read_bytes())
    rec = HEADER.size + 100
    data[2 * rec + HEADER.size + 10] ^= 0xFF  # one bit flipped inside record 2's payload
    path.write_bytes(bytes(data))

    again = Spool(str(tmp_path), max_bytes=1 << 20)
    r = again.recovery
    assert (r.records, r.damaged_bytes, r.truncated_bytes) == (4, rec, 0)
    assert f"bytes {2 * rec}..{3 * rec}" in r.describe()
    assert drain(again) == [payload(i) for i in (0, 1, 3, 4)]


def test_a_damaged_header_resyncs_at_the_next_record(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20)
    fill(s, 4)
    crash(s)
    (seg,) = segments(tmp_path)
    path = tmp_path / seg
    data = bytearray(path.read_bytes())
    rec = HEADER.size + 100
    data[rec + 8 : rec + 12] = b"\xff\xff\xff\x7f"  # record 1's length: absurd
    path.write_bytes(bytes(data))
    again = Spool(str(tmp_path), max_bytes=1 << 20)
    assert again.recovery.records == 3 and again.recovery.damaged_bytes == rec
    assert drain(again) == [payload(i) for i in (0, 2, 3)]


def test_a_torn_last_append_is_cut_off_and_appends_go_on(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20)
    fill(s, 3)
    crash(s)
    (seg,) = segments(tmp_path)
    path = tmp_path / seg
    full = path.stat().st_size
    os.truncate(path, full - 40)  # the last record half written when the process died

    again = Spool(str(tmp_path), max_bytes=1 << 20)
    rec = HEADER.size + 100
    assert again.recovery.records == 2 and again.recovery.truncated_bytes == rec - 40
    assert path.stat().st_size == 2 * rec  # cut back to the last intact record
    again.append(3, [b"after"])
    again.sync()
    assert drain(again) == [payload(0), payload(1), b"after"]


def test_the_bound_refuses_and_writes_nothing(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1000)
    fill(s, 8)  # 8 x 116 bytes
    before = s.size
    with pytest.raises(SpoolFull, match="max 1000 bytes"):
        s.append(3, [payload(9)])
    assert s.size == before == sum(os.path.getsize(tmp_path / f) for f in segments(tmp_path))
    drain(s)  # drained: room again
    s.append(3, [payload(9)])


def test_a_full_disk_refuses_and_leaves_no_partial_record(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    try:
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
            check=True,
            capture_output=True,
        )
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a small tmpfs here: {e}")
    try:
        s = Spool(str(mnt / "spool"), max_bytes=1 << 30)  # the disk is the bound here
        n = 0
        with pytest.raises(SpoolFull, match="disk full"):
            while True:
                s.append(3, [payload(n, 20_000)])
                n += 1
        s.sync()
        crash(s)
        again = Spool(str(mnt / "spool"), max_bytes=1 << 30)
        assert again.recovery.records == n and not again.recovery.truncated_bytes
        assert not again.recovery.damaged
        assert drain(again) == [payload(i, 20_000) for i in range(n)]
        again.append(3, [payload(0, 20_000)])  # space came back
        again.close()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_one_collector_per_spool_directory(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20)
    with pytest.raises(SpoolLocked, match=f"pid {os.getpid()}"):
        Spool(str(tmp_path), max_bytes=1 << 20, lock_timeout_s=0.3)
    s.close()
    Spool(str(tmp_path), max_bytes=1 << 20).close()  # free once it closed


def test_a_record_the_store_refuses_is_kept_aside(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20)
    fill(s, 2)
    (bad, good) = s.read(1 << 20)
    s.reject(bad, "InvalidInput: " + uuid.uuid4().hex)
    s.consumed()
    items = list(scan((tmp_path / "rejected.spool").read_bytes()))  # same record format
    assert [it[3] for it in items] == [bad.payload]
    assert good.payload == payload(1)
