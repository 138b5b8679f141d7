"""Fixed-size rolling windows over vectors, for baselines that must survive a restart, and the
NaN-ignoring median they (and the per-layer statistics of the detectors) are judged by.

`Rolling(shape, size)` keeps the last `size` pushed rows of shape `shape`, per element, so one
window serves every expert of every layer at once. An element that was not accepted on a push
(or not finite) records NaN for that step and does not count: a site that had no tokens on
some steps simply has fewer observations. The window is one float32 ring buffer [slot,
element], grown by doubling until it holds `size` rows: a push writes one row, and the number
of observations per element is kept up to date. The per-element median is one contiguous
sort along the window axis (numpy's vectorised float32 sort) of only the elements asked for,
instead of numpy's nanmedian, which goes through numpy.ma once NaN are present (~60-120 ms
per step at 13,000 sites; ~2-4 ms for all of them this way). `min()` is a one-pass lower bound of the median, with which
MaxAbsSpike proves most sites calm without sorting their windows. State is plain arrays
(`state_dict`).
"""

from __future__ import annotations

import numpy as np


def nanmedian(x: np.ndarray, axis: int = -1, count: np.ndarray | None = None) -> np.ndarray:
    """np.nanmedian(x, axis) - NaN ignored, NaN where a slice has no value, no warning - by
    one sort (NaN sort last) and two gathers. `count`: the non-NaN values per slice, when the
    caller already knows them (shape of the result)."""
    x = np.asarray(x)
    axis = axis % x.ndim
    out_shape = x.shape[:axis] + x.shape[axis + 1 :]
    if x.shape[axis] == 0:
        return np.full(out_shape, np.nan)
    s = np.sort(x, axis=axis)
    n = (
        np.count_nonzero(~np.isnan(s), axis=axis)
        if count is None
        else np.asarray(count).reshape(out_shape)
    )
    n = np.expand_dims(n, axis)
    lo = np.take_along_axis(s, np.maximum(n - 1, 0) // 2, axis).astype(np.float64)
    hi = np.take_along_axis(s, np.minimum(n // 2, x.shape[axis] - 1), axis)
    return ((lo + hi) / 2).squeeze(axis)  # n == 0: both are NaN (sorted last)


START_SLOTS = 8  # rows a new window holds; it doubles (up to its size) as pushes need


def _capacity(k: int, size: int) -> int:
    """Rows of a window of `size` after k pushes: START_SLOTS doubled until it holds k."""
    rows = START_SLOTS
    while rows < k:
        rows *= 2
    return min(rows, size)


class Rolling:
    def __init__(self, shape: tuple[int, ...], size: int) -> None:
        if size < 1:
            raise ValueError(f"a rolling window needs size >= 1, got {size}")
        self._shape = tuple(int(n) for n in shape)
        self.size = size
        n = int(np.prod(self._shape, dtype=np.int64))
        # [slot, element]; rows are added as pushes need them (START_SLOTS, doubling up to
        # size): a window is full only after `size` steps, and at a million metrics a full
        # one costs its whole size (~40-200 rows of 4 MB) at the first step
        self.buf = np.full((_capacity(1, size), n), np.nan, np.float32)
        self.pos = 0  # next slot to overwrite
        self._count = np.zeros(n, np.int64)  # non-NaN slots per element

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    def push(self, row: np.ndarray, accept: np.ndarray | None = None) -> None:
        """Append one observation per element; elements where accept is False (or the value
        is not finite, also after narrowing to float32) record NaN and so do not count."""
        row = np.asarray(row, dtype=np.float64)
        if row.shape != self._shape:
            raise ValueError(
                f"rolling window of shape {self._shape} got a row of shape {row.shape}"
            )
        with np.errstate(over="ignore"):  # > 3.4e38 narrows to inf: not counted
            new = row.astype(np.float32).reshape(-1)
        ok = (
            np.isfinite(new)
            if accept is None
            else (np.isfinite(new) & np.asarray(accept, dtype=bool).reshape(-1))
        )
        new[~ok] = np.nan
        if self.pos == self.buf.shape[0]:  # not full yet, and every row is used: grow
            self._resize(_capacity(self.pos + 1, self.size))
        self._count += ok.astype(np.int64) - ~np.isnan(self.buf[self.pos])
        self.buf[self.pos] = new
        self.pos = (self.pos + 1) % self.size

    def count(self) -> np.ndarray:
        return self._count.reshape(self._shape).copy()

    def min(self) -> np.ndarray:
        """Per element, the smallest observation in the window (NaN: none). One pass over the
        window, no sort: a lower bound of the median that decides most elements' fate."""
        return np.fmin.reduce(self.buf, axis=0).astype(np.float64).reshape(self._shape)

    def median(self, select: np.ndarray | None = None) -> np.ndarray:
        """Per element, the median of its observations in the window (NaN: none). With
        `select` (bool, of the window's shape) only those elements are computed and the rest
        are NaN: the sort is the whole cost, and callers rarely need every element's."""
        if select is None:
            cols = np.arange(self.buf.shape[1])
        else:
            cols = np.flatnonzero(np.broadcast_to(select, self._shape))
        out = np.full(self.buf.shape[1], np.nan)
        if cols.size:
            window = np.ascontiguousarray(self.buf[:, cols].T)  # [element, slot]
            out[cols] = nanmedian(window, axis=1, count=self._count[cols])
        return out.reshape(self._shape)

    def oldest(self) -> np.ndarray:
        """The row pushed `size` pushes ago (NaN everywhere until the window is full)."""
        if self.buf.shape[0] < self.size:  # fewer than `size` pushes so far
            return np.full(self._shape, np.nan)
        return self.buf[self.pos].astype(np.float64).reshape(self._shape)

    def _resize(self, rows: int) -> None:
        buf = np.full((rows, self.buf.shape[1]), np.nan, np.float32)
        buf[: self.buf.shape[0]] = self.buf
        self.buf = buf

    def state_dict(self) -> dict:
        """{"buf": float32 [k, *shape], the first k slots in slot order, "pos": next slot to
        overwrite}: the slots after the last one holding any value are left out (all NaN; a
        window not yet full, e.g. a run of 5 steps with a 40-step window, saves 5 of 40)."""
        held = np.flatnonzero(~np.isnan(self.buf).all(axis=1))
        k = int(held[-1]) + 1 if held.size else 0
        return {"buf": self.buf[:k].reshape(k, *self._shape).copy(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        buf = np.asarray(state["buf"])
        if (
            buf.ndim != 1 + len(self._shape)
            or buf.shape[1:] != self._shape
            or not (buf.shape[0] <= self.size)
        ):
            raise ValueError(
                f"rolling window state has shape {buf.shape}, expected at most "
                f"{(self.size, *self._shape)}"
            )
        pos = int(state["pos"])
        if not 0 <= pos < self.size:
            raise ValueError(f"rolling window state has pos {pos}, outside [0, {self.size})")
        k = buf.shape[0]
        # the slots left out held nothing: a window that never wrapped (pos == k) gets the
        # rows a window of k pushes has, any other the whole ring
        rows = _capacity(k, self.size) if pos == k else self.size
        if k < rows:
            pad = np.full((rows - k, *self._shape), np.nan, np.float32)
            buf = np.concatenate([buf.astype(np.float32), pad])
        with np.errstate(over="ignore"):
            flat = buf.reshape(buf.shape[0], -1).astype(np.float32)
        flat[~np.isfinite(flat)] = np.nan
        self.buf, self.pos = flat, pos
        self._count = np.count_nonzero(~np.isnan(self.buf), axis=0).astype(np.int64)
