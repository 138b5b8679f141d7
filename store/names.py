"""Name -> id for millions of metric names, without a Python object per name.

A run's dictionary grows by whole schema parts (thousands to tens of thousands of names at a
time) up to 10^7 names, so a dict of str is the wrong shape: ~100 bytes and one Python call per
name. Here a name is its 64-bit hash (polars' vectorised string hash), kept next to its id in
an open-addressing table of numpy arrays that a whole part probes at once (`NameIndex`): 24-48
bytes per name (load 1/4 to 1/2).

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
    """hash -> ids in an open-addressing table (linear probing) held in two numpy arrays,
    probed for a whole batch of keys at once: ~1.5 random reads a key at load <= 1/2, where a
    binary search over sorted levels made ~20 (most of the registry's time at 10 M names).
    Slot value 0 is "empty", so a hash of 0 is stored as 1 (it only adds a candidate)."""

    def __init__(self, capacity: int = 1 << 12) -> None:
        self._keys = np.zeros(capacity, np.uint64)
        self._ids = np.full(capacity, -1, np.int32)
        self.size = 0

    @staticmethod
    def _key(hashes: np.ndarray) -> np.ndarray:
        h = np.asarray(hashes, np.uint64)
        return np.where(h == 0, np.uint64(1), h)

    def add(self, hashes: np.ndarray, ids: np.ndarray) -> None:
        if hashes.size == 0:
            return
        if 2 * (self.size + hashes.size) > self._keys.size:
            self._grow(2 * (self.size + hashes.size))
        self._place(self._key(hashes), np.asarray(ids, np.int32))
        self.size += hashes.size

    def _grow(self, need: int) -> None:
        cap = self._keys.size
        while cap < need:
            cap *= 2
        full = self._keys != 0
        keys, ids = self._keys[full], self._ids[full]
        self._keys = np.zeros(cap, np.uint64)
        self._ids = np.full(cap, -1, np.int32)
        self._place(keys, ids)

    def _place(self, keys: np.ndarray, ids: np.ndarray) -> None:
        """Insert every (key, id) (equal keys too: each gets its own slot)."""
        mask = np.uint64(self._keys.size - 1)
        slot = keys & mask
        todo = np.arange(keys.size)
        while todo.size:
            s = slot[todo]
            cand = np.flatnonzero(self._keys[s] == 0)
            # of several keys aiming at one free slot one takes it (the last write of its
            # position into the free slot's id, read back: no sort); the rest probe on
            pos = np.arange(cand.size, dtype=np.int32)
            self._ids[s[cand]] = pos
            won = cand[self._ids[s[cand]] == pos]
            placed = todo[won]
            self._keys[s[won]] = keys[placed]
            self._ids[s[won]] = ids[placed]
            lost = np.ones(todo.size, bool)
            lost[won] = False
            todo = todo[lost]
            slot[todo] = (slot[todo] + np.uint64(1)) & mask

    def first(self, hashes: np.ndarray) -> np.ndarray:
        """int32 id of one entry with each hash (-1 where none): a candidate, not a proof."""
        keys = self._key(hashes)
        out = np.full(keys.shape, -1, np.int32)
        mask = np.uint64(self._keys.size - 1)
        slot = keys & mask
        todo = np.arange(keys.size)
        while todo.size:
            k = self._keys[slot[todo]]
            hit = k == keys[todo]
            out[todo[hit]] = self._ids[slot[todo[hit]]]
            todo = todo[~hit & (k != 0)]  # neither found nor an empty slot: probe on
            slot[todo] = (slot[todo] + np.uint64(1)) & mask
        return out

    def all_ids(self, hash_value: int) -> list[int]:
        """Every id stored under one hash (the exact path after a collision)."""
        key = int(self._key(np.array([hash_value], np.uint64))[0])
        mask = self._keys.size - 1
        slot, out = key & mask, []
        while self._keys[slot] != 0:
            if int(self._keys[slot]) == key:
                out.append(int(self._ids[slot]))
            slot = (slot + 1) & mask
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
