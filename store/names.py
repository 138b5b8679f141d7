"""Name -> id for millions of metric names, without a Python object per name.

A run's dictionary grows by whole schema parts (thousands to tens of thousands of names at a
time) up to 10^7 names, so a dict of str is the wrong shape: ~100 bytes and one Python call per
name. Here a name is its 64-bit hash (polars' vectorised string hash), kept in a few sorted
levels next to its id, like a log-structured merge tree: adding a part sorts the part and
merges levels of similar size (each hash is merged O(log parts) times); a lookup is one
`np.searchsorted` per level. 12 bytes per name.

Hashes can collide, so a hit is only a candidate: callers that must be exact compare the
candidate's stored name (`NameTable.lookup` does; the store's uniqueness check treats a hit as
"maybe" and takes its exact slow path). Every id with a given hash is kept, so `all_ids` finds
the right one after a collision.
"""

from __future__ import annotations

import numpy as np
import polars as pl

HASH_SEED = 0x5EED


def name_hashes(names: pl.Series) -> np.ndarray:
    """uint64 hash of each name (deterministic within a process)."""
    return names.hash(seed=HASH_SEED).to_numpy()


class NameIndex:
    """hash -> ids, sorted levels of decreasing size (oldest first)."""

    def __init__(self) -> None:
        self._h: list[np.ndarray] = []  # uint64, ascending
        self._ids: list[np.ndarray] = []  # int32, in the same order
        self.size = 0

    def add(self, hashes: np.ndarray, ids: np.ndarray) -> None:
        if hashes.size == 0:
            return
        order = np.argsort(hashes, kind="stable")
        self._h.append(hashes[order])
        self._ids.append(np.asarray(ids, np.int32)[order])
        self.size += hashes.size
        while len(self._h) > 1 and self._h[-2].size <= 2 * self._h[-1].size:
            h = np.concatenate([self._h[-2], self._h.pop()])
            i = np.concatenate([self._ids[-2], self._ids.pop()])
            order = np.argsort(h, kind="stable")  # two sorted runs: a linear merge
            self._h[-1], self._ids[-1] = h[order], i[order]

    def first(self, hashes: np.ndarray) -> np.ndarray:
        """int32 id of one entry with each hash (-1 where none): a candidate, not a proof."""
        order = np.argsort(hashes)  # sorted queries walk each level in order: cache-friendly
        q = hashes[order]
        found = np.full(q.shape, -1, np.int32)
        for h, ids in zip(self._h, self._ids):
            pos = np.minimum(np.searchsorted(h, q), h.size - 1)
            hit = (h[pos] == q) & (found < 0)
            found[hit] = ids[pos[hit]]
        out = np.empty_like(found)
        out[order] = found
        return out

    def all_ids(self, hash_value: int) -> list[int]:
        """Every id stored under one hash (the exact path after a collision)."""
        out: list[int] = []
        for h, ids in zip(self._h, self._ids):
            key = np.uint64(hash_value)
            a, b = int(np.searchsorted(h, key, "left")), int(np.searchsorted(h, key, "right"))
            out += ids[a:b].tolist()
        return out


class NameTable:
    """Dense ids 0..n-1 for names, exact: the index plus the names themselves (one polars
    string column, appended part by part), so a hash hit is confirmed by comparing names."""

    def __init__(self) -> None:
        self.index = NameIndex()
        self.names = pl.Series("name", [], pl.Utf8)

    def __len__(self) -> int:
        return self.names.len()

    def lookup(self, names: pl.Series, hashes: np.ndarray | None = None) -> np.ndarray:
        """int32 id of each name, -1 where it has none."""
        hashes = name_hashes(names) if hashes is None else hashes
        ids = self.index.first(hashes)
        found = np.flatnonzero(ids >= 0)
        if found.size:
            same = (self.names.gather(ids[found]) == names.gather(found)).to_numpy()
            for i in found[~same].tolist():  # a collision: look at every id of that hash
                name = names[i]
                ids[i] = next(
                    (j for j in self.index.all_ids(int(hashes[i])) if self.names[j] == name), -1
                )
        return ids

    def append(self, names: pl.Series, hashes: np.ndarray | None = None) -> np.ndarray:
        """Give `names` (new, distinct) the next ids; returns them."""
        hashes = name_hashes(names) if hashes is None else hashes
        first = len(self)
        ids = np.arange(first, first + names.len(), dtype=np.int32)
        self.names.append(names.rename("name"))
        if self.names.n_chunks() > 64:
            self.names = self.names.rechunk()
        self.index.add(hashes, ids)
        return ids

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        return bool(self.lookup(pl.Series([name], dtype=pl.Utf8))[0] >= 0)
