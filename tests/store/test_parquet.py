"""What only the Parquet backend has: segment files, compaction, writer lock, file layout."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pyarrow.parquet as pq
import pytest

from store import MetricDict, NotFound, RunInfo, StoreError, ValueBatch, segments
from store.parquet import ParquetStore

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
M = 3  # metrics per run in these tests


def new_store(root, run="r1") -> ParquetStore:
    st = ParquetStore(str(root), fsync=False)
    st.open_run(RunInfo(run, 2))
    st.write_metrics(
        run,
        MetricDict(
            np.arange(M),
            [f"m{i}" for i in range(M)],
            np.full(M, -1),
            np.full(M, -1),
            np.full(M, -1),
            [""] * M,
            [""] * M,
            ["mean"] * M,
        ),
    )
    return st


def put(st, steps, values, run="r1", mid=0):
    steps = np.atleast_1d(steps)
    st.write_reduced(
        run,
        ValueBatch(
            steps,
            np.full(steps.size, mid),
            np.asarray(values, float),
            n_ranks=np.full(steps.size, 2),
        ),
    )


def seg_dir(root, table="reduced_vectors", run="r1"):
    return os.path.join(root, run, table)


def live_segments(root):
    return segments.SegmentLog(seg_dir(root), "reduced_vectors").list()


def overwrite_history(st, expect, rng, n_flush, start=0):
    """Append one step per flush and overwrite a random older step: the reference model
    `expect` says what last-write-wins must return."""
    for i in range(start, start + n_flush):
        put(st, i, [i])
        expect[i] = float(i)
        old = rng.randrange(i + 1)
        put(st, old, [-i])
        expect[old] = float(-i)
        st.flush()


def test_compaction_bounds_files_and_keeps_last_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "FANOUT", 3)
    st, expect, rng = new_store(tmp_path), {}, random.Random(0)
    overwrite_history(st, expect, rng, 60)
    segs = live_segments(tmp_path)
    assert [s.level for s in segs] == [3, 3, 1, 1]  # 60 flushes = 2020 in base FANOUT
    assert [s.lo for s in segs[1:]] == [s.hi + 1 for s in segs[:-1]]  # disjoint, contiguous
    reader = ParquetStore(str(tmp_path))
    assert dict(reader.series("r1", "m0").rows()) == expect
    assert dict(reader.series("r1", "m0", start=10, stop=20).rows()) == {
        k: v for k, v in expect.items() if 10 <= k < 20
    }
    st.close()


def overlapping(segs) -> bool:
    return any(o is not s and o.lo <= s.hi and s.lo <= o.hi for s in segs for o in segs)


def test_merge_interrupted_before_deleting_inputs(tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "FANOUT", 3)
    st, expect, rng = new_store(tmp_path), {}, random.Random(1)
    overwrite_history(st, expect, rng, 10)
    real_unlink = os.unlink

    def failing_unlink(path, *a, **kw):  # a crash right after a merge's write
        if path.endswith(".parquet"):
            raise OSError("simulated crash before deleting merge inputs")
        return real_unlink(path, *a, **kw)

    def interrupted_merges(st, start):
        monkeypatch.setattr(segments.os, "unlink", failing_unlink)
        overwrite_history(st, expect, rng, 10, start=start)
        monkeypatch.setattr(segments.os, "unlink", real_unlink)
        assert overlapping(live_segments(tmp_path))  # merge results next to their inputs
        assert dict(ParquetStore(str(tmp_path)).series("r1", "m0").rows()) == expect

    interrupted_merges(st, 10)
    overwrite_history(st, expect, rng, 1, start=20)  # the same writer's next compaction
    assert not overlapping(live_segments(tmp_path))  # cleans up
    interrupted_merges(st, 21)
    st.close()
    st = ParquetStore(str(tmp_path), fsync=False)  # as does the next writer
    put(st, 0, [-100.0])
    expect[0] = -100.0
    assert not overlapping(live_segments(tmp_path))  # at its first write, before a flush
    overwrite_history(st, expect, rng, 10, start=31)
    assert dict(st.series("r1", "m0").rows()) == expect
    st.close()


def test_reader_retries_when_compaction_deletes_what_it_listed(tmp_path, monkeypatch):
    monkeypatch.setattr(segments, "FANOUT", 3)
    st, expect, rng = new_store(tmp_path), {}, random.Random(2)
    overwrite_history(st, expect, rng, 2)
    stale = live_segments(tmp_path)
    overwrite_history(st, expect, rng, 1, start=2)  # merges (and deletes) those files
    assert not all(os.path.exists(s.path) for s in stale)
    calls, real_list = [], segments.SegmentLog.list

    def list_once_stale(self):
        calls.append(1)
        return stale if len(calls) == 1 else real_list(self)

    monkeypatch.setattr(segments.SegmentLog, "list", list_once_stale)
    assert dict(ParquetStore(str(tmp_path)).series("r1", "m0").rows()) == expect
    assert len(calls) == 2
    st.close()


def test_killed_mid_flush_leaves_a_temp_file_that_nobody_reads(tmp_path):
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_parquet import new_store, put
        st = new_store({str(tmp_path)!r})
        put(st, [0, 1], [1.0, 2.0])
        st.flush()
        put(st, [1, 2], [9.0, 9.0])
        os.replace = lambda *a: os._exit(9)             # die between temp write and rename
        st.flush()
    """)
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert proc.returncode == 9, proc.stderr
    tmps = [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]
    assert tmps, "the simulated crash should have left a temp file"
    reader = ParquetStore(str(tmp_path))
    assert reader.series("r1", "m0").rows() == [(0, 1.0), (1, 2.0)]
    st = ParquetStore(str(tmp_path), fsync=False)  # the dead writer's lock is gone
    put(st, 2, [3.0])
    st.flush()
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]
    assert reader.series("r1", "m0")["value"].to_list() == [1.0, 2.0, 3.0]
    st.close()


def test_failed_flush_raises_keeps_buffer_and_retries(tmp_path, monkeypatch):
    st = new_store(tmp_path)
    put(st, [0], [1.0])
    st.flush()
    put(st, [1], [2.0])

    def disk_full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(segments.os, "replace", disk_full)
    with pytest.raises(StoreError, match="No space"):
        st.flush()
    monkeypatch.undo()
    reader = ParquetStore(str(tmp_path))
    assert reader.series("r1", "m0")["step"].to_list() == [0]  # nothing half-visible
    assert not [f for _, _, fs in os.walk(tmp_path) for f in fs if f.endswith(".tmp")]
    put(st, [1], [5.0])  # a newer write of the same key
    st.flush()
    assert reader.series("r1", "m0").rows() == [(0, 1.0), (1, 5.0)]
    st.close()


def test_series_opens_only_segments_overlapping_its_range(tmp_path):
    st = new_store(tmp_path)
    for lo in range(0, 40, 10):  # four flushes, steps 0-9 ... 30-39
        put(st, np.arange(lo, lo + 10), np.arange(lo, lo + 10))
        st.flush()
    first = live_segments(tmp_path)[0]
    assert (first.step_min, first.step_max) == (0, 9)
    with open(first.path, "wb") as f:  # any read of it would now fail
        f.write(b"not parquet")
    assert st.series("r1", "m0", start=10, stop=35)["step"].to_list() == list(range(10, 35))
    assert st.at_step("r1", 20)["value"].to_list() == [20.0]
    with pytest.raises(StoreError, match="cannot read"):
        st.series("r1", "m0", start=5)
    last = live_segments(tmp_path)[-1]
    assert (last.step_min, last.step_max) == (30, 39)
    with open(last.path, "wb") as f:
        f.write(b"not parquet")
    assert st.series("r1", "m0", start=10, stop=30)["step"].to_list() == list(range(10, 30))
    st.close()


def test_each_flush_writes_only_what_is_new(tmp_path):
    st = new_store(tmp_path)
    put(st, np.arange(5), np.arange(5))
    st.flush()
    put(st, 7, [7.0])
    st.flush()
    st.flush()  # nothing pending: no new file
    assert [(s.rows, s.step_min, s.step_max) for s in live_segments(tmp_path)] == [
        (5, 0, 4),
        (1, 7, 7),
    ]
    st.close()


def test_segments_sorted_zstd_with_row_group_statistics(tmp_path, monkeypatch):
    """Reduced values are one vector row per (step, layout): rows sorted by step, zstd, row
    groups with step statistics (a step-range read skips the others), one layout stored."""
    monkeypatch.setattr(segments, "ROW_GROUP_ROWS", 40)
    st = new_store(tmp_path)
    order = np.random.default_rng(0).permutation(M * 100)  # written shuffled
    steps, mids = order % 100, order // 100
    st.write_reduced("r1", ValueBatch(steps, mids, steps * 1.0, n_ranks=np.full(order.size, 2)))
    st.flush()
    (seg,) = live_segments(tmp_path)
    meta = pq.ParquetFile(seg.path).metadata
    assert meta.num_rows == 100 and meta.num_row_groups == 3  # a row per step, not per value
    cols = [meta.schema.column(i).name for i in range(meta.num_columns)]
    for g, (lo, hi) in enumerate([(0, 39), (40, 79), (80, 99)]):
        rg = meta.row_group(g)
        step = rg.column(cols.index("step"))
        assert rg.column(cols.index("values")).compression == "ZSTD"
        assert (step.statistics.min, step.statistics.max) == (lo, hi)
    t = pq.read_table(seg.path)
    assert (np.diff(np.array(t["step"])) > 0).all()  # sorted by step, unique
    assert len(set(t["layout"].to_pylist())) == 1  # the same ids every step, in any order
    reader = ParquetStore(str(tmp_path))
    assert dict(reader.series("r1", "m2", start=10, stop=13).rows()) == {10: 10, 11: 11, 12: 12}
    st.close()


def test_one_writer_per_run(tmp_path):
    w1 = new_store(tmp_path)
    w1.flush()
    w2 = ParquetStore(str(tmp_path), fsync=False)
    with pytest.raises(StoreError, match="another store instance"):
        w2.open_run(RunInfo("r1", 2))
    with pytest.raises(StoreError):
        put(w2, 0, [1.0])
    w2.open_run(RunInfo("r2", 2))  # other runs are free
    assert w2.metrics("r1").height == M  # and reading is always allowed
    w1.close()
    put(w2, 0, [1.0])  # released on close
    w2.flush()
    assert w2.series("r1", "m0").rows() == [(0, 1.0)]
    w2.close()


def test_reads_never_create_files(tmp_path):
    root = tmp_path / "absent"
    st = ParquetStore(str(root))
    assert st.runs().height == 0
    with pytest.raises(NotFound):
        st.series("r1", "m0")
    st.close()
    assert not root.exists()


def test_a_corrupt_file_is_a_store_error_naming_it(tmp_path):
    st = new_store(tmp_path)
    st.flush()
    st.close()
    path = os.path.join(tmp_path, "r1", "run.parquet")
    with open(path, "wb") as f:
        f.write(b"garbage")
    with pytest.raises(StoreError, match="run.parquet"):
        ParquetStore(str(tmp_path)).runs()


def _dict_rows(ids, names, layer=-1) -> MetricDict:
    n = len(ids)
    return MetricDict(
        np.asarray(ids), list(names), np.full(n, layer), np.full(n, -1), np.full(n, -1),
        ["s"] * n, [""] * n, ["sum"] * n,
    )  # fmt: skip


def test_the_metric_dictionary_is_appended_per_flush_never_rewritten(tmp_path):
    """Each flush that brings dictionary rows adds one part file holding only them; earlier
    parts stay byte for byte; an upsert is one more part that wins on read; a store written
    by an older version (one metrics.parquet) is still read, under the new parts."""
    st = new_store(tmp_path)  # ids 0..2
    st.flush()
    d = tmp_path / "r1" / "metrics"
    first = sorted(os.listdir(d))
    stat0 = os.stat(d / first[0])
    st.write_metrics("r1", _dict_rows(range(3, 1003), [f"n{i}" for i in range(1000)]))
    st.flush()
    st.write_metrics("r1", _dict_rows([1], ["m1"], layer=7))  # an upsert of an old id
    st.flush()
    parts = sorted(os.listdir(d))
    assert len(parts) == 3 and parts[0] == first[0]
    assert os.stat(d / parts[0]).st_mtime_ns == stat0.st_mtime_ns  # never rewritten
    assert [pq.read_metadata(d / p).num_rows for p in parts] == [3, 1000, 1]
    df = st.metrics("r1")
    assert df["metric_id"].to_list() == list(range(1003))
    assert df["name"].to_list()[:4] == ["m0", "m1", "m2", "n0"]
    assert df["layer"].to_list()[:3] == [-1, 7, -1]
    with pytest.raises(Exception, match="unique"):  # a taken name is still refused
        st.write_metrics("r1", _dict_rows([5000], ["n7"]))
    st.close()
    legacy = ParquetStore(str(tmp_path / "old"), fsync=False)
    legacy.open_run(RunInfo("r1", 1))
    legacy.flush()
    pq.write_table(pq.read_table(d / parts[0]), tmp_path / "old" / "r1" / "metrics.parquet")
    legacy.write_metrics("r1", _dict_rows([3], ["x"]))
    legacy.flush()
    assert legacy.metrics("r1")["name"].to_list() == ["m0", "m1", "m2", "x"]
    legacy.close()
