"""Detector and clip-policy state as bytes, to save in a store and load after a restart.

    blob = encode(state)          state = decode(blob)

`state` is what the analytics classes' `state_dict()` give (nested dicts and lists of
numbers, strings, None, numpy arrays; tuples come back as lists, which every
`load_state_dict` accepts). The format, version 2:

    b"SWDS" | u8 version | u32 CRC-32 of body | body
    body = u32 length of meta | meta (JSON) | array bytes...

Version 1 (still read) held zlib(body) instead: the arrays are mostly rolling windows of
float32 statistics, which hardly compress, and zlib took 4 s for the ~150 MB state of a run of
1 M metrics (the CRC keeps what zlib's checksum gave: damage is found, not decoded).

meta is {"tree": the state with each array replaced by {"__nd__": i}, "arrays": [[dtype,
shape], ...]}; the arrays follow in that order, C order, little-endian as their dtype string
says. No pickle: a blob from anywhere decodes to plain data or raises BadState.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np

MAGIC = b"SWDS"
VERSION = 2
READS = (1, 2)
U32 = struct.Struct("<I")
_ND = "__nd__"


class BadState(ValueError):
    """A blob that is not detector state this code can read (says why)."""


def encode(state: Any) -> bytes:
    arrays: list[np.ndarray] = []

    def tree(x: Any) -> Any:
        if isinstance(x, np.ndarray):
            arrays.append(np.ascontiguousarray(x))
            return {_ND: len(arrays) - 1}
        if isinstance(x, np.generic):
            return x.item()
        if isinstance(x, dict):
            if not all(isinstance(k, str) for k in x):
                raise TypeError(f"state dict keys must be strings, got {list(x)[:3]}")
            if _ND in x:
                raise TypeError(f"state dict key {_ND!r} is reserved")
            return {k: tree(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [tree(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot encode {type(x).__name__} in detector state")

    meta = {"tree": tree(state), "arrays": [[a.dtype.str, list(a.shape)] for a in arrays]}
    if any(a.dtype.hasobject for a in arrays):
        raise TypeError("object arrays cannot be encoded in detector state")
    text = json.dumps(meta, separators=(",", ":")).encode()
    body = b"".join([U32.pack(len(text)), text, *(a.tobytes() for a in arrays)])
    return b"".join([MAGIC, bytes([VERSION]), U32.pack(zlib.crc32(body)), body])


def decode(blob: bytes) -> Any:
    if blob[:4] != MAGIC:
        raise BadState("not detector state (no SWDS header)")
    if len(blob) < 5 or blob[4] not in READS:
        raise BadState(f"detector state format {blob[4:5]!r}, this code reads {READS}")
    try:
        body: bytes | memoryview
        if blob[4] == 1:
            body = zlib.decompress(blob[5:])
        else:
            (crc,) = U32.unpack_from(blob, 5)
            body = memoryview(blob)[9:]
            if zlib.crc32(body) != crc:
                raise BadState("detector state is damaged (CRC-32 mismatch)")
        (n,) = U32.unpack_from(body, 0)
        meta = json.loads(bytes(body[4 : 4 + n]))
        pos, arrays = 4 + n, []
        for dtype, shape in meta["arrays"]:
            dt = np.dtype(dtype)
            if dt.hasobject:
                raise BadState("detector state holds an object array")
            count = int(np.prod(shape, dtype=np.int64))
            if pos + count * dt.itemsize > len(body):
                raise BadState("detector state is truncated")
            arrays.append(np.frombuffer(body, dt, count, pos).reshape(shape).copy())
            pos += count * dt.itemsize
        if pos != len(body):
            raise BadState(f"detector state has {len(body) - pos} bytes beyond its arrays")
    except BadState:
        raise
    except (zlib.error, struct.error, ValueError, TypeError, KeyError) as e:
        raise BadState(f"detector state is damaged ({type(e).__name__}: {e})") from e

    def back(x: Any) -> Any:
        if isinstance(x, dict):
            if set(x) == {_ND}:
                return arrays[int(x[_ND])]
            return {k: back(v) for k, v in x.items()}
        if isinstance(x, list):
            return [back(v) for v in x]
        return x

    return back(meta["tree"])
