"""Backend-independent store pieces (frames, globs, validate, vectors): glob semantics,
dictionary merging, store URLs."""

from __future__ import annotations

import fnmatch

import numpy as np
import polars as pl
import pytest

from store import InvalidInput, MetricDict, ValueBatch, open_store
from store.frames import last_wins
from store.globs import glob_to_regex
from store.memory import MemoryStore
from store.parquet import ParquetStore
from store.validate import metrics_frame
from store.vectors import batch_vectors, layout_hash, vector_cells

NAMES = [
    "moe/layer07/expert013/act_rms",
    "moe/layer07/expert013/act_max",
    "loss",
    "grad_norm",
    "attn/layer00/head03/max_logit",
    "a.b",
    "a+b",
    "a[1]",
    "a]b",
    "x-y",
    "x!y",
    "^start",
    "dollar$",
    "back\\slash",
    "tab\there",
    "new\nline",
    "(paren)",
    "ünïcode/é",
    "a*b",
    "a?b",
    "",
    "-",
    "]",
    "[",
    "!",
]

PATTERNS = [
    "*",
    "",
    "loss",
    "l?ss",
    "moe/*",
    "*/act_*",
    "moe/layer0[0-7]/*",
    "*[!a-z]",
    "[!m]*",
    "a[.+]b",
    "a[]]b",
    "a[!]]b",
    "a[]",
    "a[1]",
    "a[[]1]",
    "[a-]*",
    "x[!-]y",
    "*\\*",
    "dollar$",
    "^*",
    "(*)",
    "*é",
    "[z-a]",
    "[!z-a]",
    "a[b-b]",
    "tab?here",
    "new?line",
    "*.*",
    "a?b",
    "a*b",
    "?",
    "[]-]",
    "[!]-]",
    "[",
    "]",
    "[!",
    "!",
]


@pytest.mark.parametrize("pattern", PATTERNS)
def test_glob_matches_exactly_what_fnmatchcase_matches(pattern):
    names = pl.Series(NAMES)
    got = names.filter(names.str.contains(glob_to_regex(pattern))).to_list()
    assert got == [n for n in NAMES if fnmatch.fnmatchcase(n, pattern)]


def test_glob_rejects_non_strings():
    with pytest.raises(InvalidInput):
        glob_to_regex(None)


def test_last_wins_keeps_the_last_row_of_each_key():
    df = pl.DataFrame({"k": [1, 2, 1, 3, 1, 2], "v": [1, 2, 3, 4, 5, 6]})
    assert last_wins(df, ["k"]).sort("k").rows() == [(1, 5), (2, 6), (3, 4)]


def test_metrics_frame_last_row_wins_within_one_dictionary():
    md = MetricDict(
        np.array([0, 1, 0]),
        ["a", "b", "c"],
        np.full(3, -1),
        np.full(3, -1),
        np.full(3, -1),
        ["", "", ""],
        ["", "", ""],
        ["sum", "max", "min"],
    )
    df = metrics_frame(md).sort("metric_id")
    assert df.select("metric_id", "name", "reduce").rows() == [(0, "c", "min"), (1, "b", "max")]


def test_open_store_urls(tmp_path):
    assert isinstance(open_store("memory:"), MemoryStore)
    st = open_store(f"parquet:{tmp_path}/a")
    assert isinstance(st, ParquetStore) and st.root == f"{tmp_path}/a"
    assert open_store(f"parquet://{tmp_path}/b").root == f"{tmp_path}/b"
    assert not (tmp_path / "a").exists()  # opening alone creates nothing
    for bad in ("parquet:", "sqlite:x", "", "memory:x", "clickhouse+http://h/db"):
        with pytest.raises(InvalidInput, match="memory:, parquet:DIR"):
            open_store(bad)
    with pytest.raises(InvalidInput):
        open_store(None)


@pytest.mark.parametrize("seed", range(4))
def test_flat_rows_grouped_into_vectors_keep_the_last_write_of_every_cell(seed):
    """batch_vectors (write_raw) against a dict model: shuffled or grouped input, repeated
    cells, huge steps and sparse ids (the sort-based paths); one vector per (step, rank)."""
    rng = np.random.default_rng(seed)
    for trial in range(100):
        n = int(rng.integers(1, 60))
        step = rng.integers(0, 3, n) * (10**15 if trial % 7 == 0 else 1)
        rank = rng.integers(0, 3, n)
        mid = rng.integers(0, 5, n) * (10**8 if trial % 5 == 0 else 1)
        if trial % 3 == 0:  # already grouped, as the collector
            o = np.lexsort((rank, step))
            step, rank, mid = step[o], rank[o], mid[o]
        val = rng.standard_normal(n).astype(np.float32)
        model = {(int(r), int(s), int(m)): v for s, r, m, v in zip(step, rank, mid, val)}
        frame, layouts = batch_vectors(ValueBatch(step, mid, val, rank=rank))
        assert frame.select(pl.struct("step", "rank").n_unique()).item() == frame.height
        frame = frame.with_columns(ver=pl.int_range(frame.height, dtype=pl.UInt64))
        got = {(r, s, m): v for s, m, r, v in vector_cells(frame, layouts).rows()}
        assert got == model


def test_layout_hash_is_stable_across_processes_and_versions():
    """Stored layout keys must never change meaning: pinned values."""
    assert layout_hash(np.array([0, 1, 2], np.int32)) == layout_hash([0, 1, 2])
    assert layout_hash(np.array([0, 1, 2])) != layout_hash(np.array([0, 2, 1]))
    assert layout_hash(np.array([0, 1, 2], np.int32)) == 0x6D8E69976182A599


def test_last_wins_on_keys_that_ascend_or_repeat():
    """Strictly ascending integer keys skip the unique pass (nothing repeats); a repeat
    anywhere, keys out of order, a null or a string key take it, with the same rule."""
    asc = pl.DataFrame({"s": [0, 0, 1, 2], "m": [1, 2, 0, 0], "v": [1.0, 2.0, 3.0, 4.0]})
    assert last_wins(asc, ["s", "m"]).rows() == asc.rows()
    rep = pl.DataFrame({"s": [0, 0, 1, 1], "m": [1, 2, 0, 0], "v": [1.0, 2.0, 3.0, 4.0]})
    assert sorted(last_wins(rep, ["s", "m"]).rows()) == [(0, 1, 1.0), (0, 2, 2.0), (1, 0, 4.0)]
    back = pl.DataFrame({"k": [1, 2, 1], "v": [1, 2, 3]})
    assert sorted(last_wins(back, ["k"]).rows()) == [(1, 3), (2, 2)]
    u = pl.DataFrame({"k": pl.Series([5, 7, 7], dtype=pl.UInt64), "v": [1, 2, 3]})
    assert sorted(last_wins(u, ["k"]).rows()) == [(5, 1), (7, 3)]
    nulls = pl.DataFrame({"k": [1, None, None], "v": [1, 2, 3]})
    assert sorted(last_wins(nulls, ["k"]).rows(), key=str) == [(1, 1), (None, 3)]
    names = pl.DataFrame({"k": ["a", "b", "b"], "v": [1, 2, 3]})
    assert sorted(last_wins(names, ["k"]).rows()) == [("a", 1), ("b", 3)]
