"""A set of metric ids held as sorted, disjoint ranges: which ids a rank's schemas already use.

Metric ids are dense per run and handed out in schema order, so the ids of a rank's schemas
are a handful of ranges however many metrics it has: a rank of 10 M metrics in 500 schema parts
is one range. Membership of a schema's ids is a vectorised search over the range starts
(O(n log ranges)); adding a schema merges its ranges in (O(ranges)). Registering P parts thus
costs O(total ids), where a concatenated id array checked with np.isin cost O(P x total).
"""

from __future__ import annotations

import numpy as np


class IdRanges:
    def __init__(self) -> None:
        self.starts = np.zeros(0, np.int64)  # ascending
        self.stops = np.zeros(0, np.int64)  # exclusive; stops[i] < starts[i + 1]

    def __len__(self) -> int:
        """Ids held."""
        return int((self.stops - self.starts).sum())

    def contains(self, ids: np.ndarray) -> np.ndarray:
        """Boolean mask: which of `ids` are already in the set."""
        ids = np.asarray(ids, np.int64)
        if self.starts.size == 0:
            return np.zeros(ids.shape, bool)
        k = np.searchsorted(self.starts, ids, side="right") - 1
        return (k >= 0) & (self.stops[np.maximum(k, 0)] > ids)

    def add(self, ids: np.ndarray) -> None:
        """Put `ids` in the set (duplicates and ids already held are fine)."""
        if len(ids) == 0:
            return
        a = np.asarray(ids, np.int64)
        if int(a[-1]) - int(a[0]) == a.size - 1 and (np.diff(a) == 1).all():
            # one run of consecutive ids (a schema of fresh names): no sort
            starts = np.append(self.starts, a[0])
            stops = np.append(self.stops, a[-1] + 1)
        else:
            s = np.unique(a)
            breaks = np.flatnonzero(np.diff(s) != 1) + 1
            starts = np.concatenate([self.starts, s[np.r_[0, breaks]]])
            stops = np.concatenate([self.stops, s[np.r_[breaks - 1, s.size - 1]] + 1])
        order = np.argsort(starts, kind="stable")
        starts, stops = starts[order], stops[order]
        reach = np.maximum.accumulate(stops)  # touching or overlapping ranges merge
        first = np.r_[True, starts[1:] > reach[:-1]]
        self.starts = starts[first]
        self.stops = np.maximum.reduceat(stops, np.flatnonzero(first))
