"""store/names.py: name -> id without a Python object per name. Checked against a dict over
many parts and table growths, with forced hash collisions (two names, one hash) and the hash
value the table reserves for "empty"."""

from __future__ import annotations

import numpy as np
import polars as pl

from store.names import NameIndex, NameTable


def test_lookup_matches_a_dict_over_many_parts_and_growths():
    rng = np.random.default_rng(3)
    table, oracle = NameTable(), {}
    for _ in range(40):
        names = [f"p/{x}" for x in rng.integers(0, 30_000, 2_000)]  # overlaps earlier parts
        s = pl.Series(dict.fromkeys(names).keys(), dtype=pl.Utf8)
        ids = table.lookup(s)
        assert ids.tolist() == [oracle.get(n, -1) for n in s.to_list()]
        new = s.filter(pl.Series(ids < 0))
        for n, i in zip(new.to_list(), table.append(new).tolist()):
            oracle[n] = i
    assert len(table) == len(oracle) and table.index.size == len(oracle)
    every = pl.Series(list(oracle), dtype=pl.Utf8)
    np.testing.assert_array_equal(table.lookup(every), list(oracle.values()))
    assert "p/nothing" not in table and next(iter(oracle)) in table


def test_names_that_share_a_hash_keep_their_own_ids():
    table = NameTable()
    names = pl.Series(["a", "b", "c", "d"], dtype=pl.Utf8)
    forced = np.array([7, 7, 0, 1], np.uint64)  # a and b collide; 0 is stored as 1, like d
    table.append(names.slice(0, 1), forced[:1])
    table.append(names.slice(1, 3), forced[1:])
    assert table.lookup(names, forced).tolist() == [0, 1, 2, 3]
    assert sorted(table.index.all_ids(7)) == [0, 1]
    other = pl.Series(["e"], dtype=pl.Utf8)
    assert table.lookup(other, np.array([7], np.uint64)).tolist() == [-1]  # same hash, new name


def test_the_index_finds_every_key_it_holds_after_growing():
    ix = NameIndex(capacity=8)
    keys = np.random.default_rng(1).integers(0, 2**63, 50_000, dtype=np.uint64)
    for a in range(0, keys.size, 5_000):
        ix.add(keys[a : a + 5_000], np.arange(a, a + 5_000))
    np.testing.assert_array_equal(ix.first(keys), np.arange(keys.size))
    assert ix._keys.size >= 2 * keys.size  # load stays <= 1/2
    assert (ix.first(keys + np.uint64(1)) == -1).sum() > 49_990  # absent keys: -1
