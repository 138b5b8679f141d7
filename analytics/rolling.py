"""Fixed-size rolling windows over vectors, for baselines that must survive a restart.

`Rolling(shape, size)` keeps the last `size` accepted rows of shape `shape` (NaN rows count as
"not observed"), per element, so one window serves every expert of every layer at once. The
statistics are numpy reductions over the window axis that ignore NaN: a site that had no
tokens on some steps simply has fewer observations. State is plain arrays (`state_dict`).
"""
from __future__ import annotations

import warnings

import numpy as np


class Rolling:
    def __init__(self, shape: tuple[int, ...], size: int) -> None:
        if size < 1:
            raise ValueError(f"a rolling window needs size >= 1, got {size}")
        self.size = size
        self.buf = np.full((size, *shape), np.nan)
        self.pos = 0                              # next row to overwrite

    @property
    def shape(self) -> tuple[int, ...]:
        return self.buf.shape[1:]

    def push(self, row: np.ndarray, accept: np.ndarray | None = None) -> None:
        """Append one observation per element; elements where accept is False (or the value
        is not finite) record NaN and so do not count."""
        row = np.asarray(row, dtype=np.float64)
        ok = np.isfinite(row) if accept is None else (np.isfinite(row) & accept)
        self.buf[self.pos] = np.where(ok, row, np.nan)
        self.pos = (self.pos + 1) % self.size

    def count(self) -> np.ndarray:
        return np.isfinite(self.buf).sum(axis=0)

    def _nan_reduce(self, fn, *args) -> np.ndarray:
        with warnings.catch_warnings():           # all-NaN columns give NaN, quietly
            warnings.simplefilter("ignore", RuntimeWarning)
            return fn(self.buf, *args, axis=0)

    def median(self) -> np.ndarray:
        return self._nan_reduce(np.nanmedian)

    def mad(self) -> np.ndarray:
        """Median absolute deviation, scaled by 1.4826 to estimate sigma under normality."""
        dev = np.abs(self.buf - self.median())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return 1.4826 * np.nanmedian(dev, axis=0)

    def ordered(self) -> np.ndarray:
        """The window oldest first (for trend fits)."""
        return np.roll(self.buf, -self.pos, axis=0)

    def state_dict(self) -> dict:
        return {"buf": self.buf.copy(), "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        buf = np.asarray(state["buf"], dtype=np.float64)
        if buf.shape != self.buf.shape:
            raise ValueError(f"rolling window state has shape {buf.shape}, expected "
                             f"{self.buf.shape}")
        self.buf, self.pos = buf.copy(), int(state["pos"])
