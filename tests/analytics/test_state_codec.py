"""analytics.state: the detector-state blob round-trips, damage is found, version 1 still reads."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest

from analytics.state import MAGIC, BadState, decode, encode

STATE = {
    "step": 7,
    "w": np.arange(12, dtype=np.float32).reshape(3, 4),
    "nested": {"k": [1, 2.5, None, "s"], "a": np.array([-1, 5], np.int64)},
}


def _same(a, b) -> None:
    if isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert set(a) == set(b)
        for k in a:
            _same(a[k], b[k])
    else:
        assert a == b


def test_round_trip():
    _same(STATE, decode(encode(STATE)))


def test_a_flipped_byte_anywhere_in_the_body_is_found():
    blob = bytearray(encode(STATE))
    for pos in (9, 20, len(blob) - 1):  # meta length, meta, the last array byte
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(BadState, match="damaged"):
            decode(bytes(bad))


def test_version_1_blobs_still_decode_and_unknown_versions_are_refused():
    meta = {"tree": {"step": 3, "x": {"__nd__": 0}}, "arrays": [["<f4", [2]]]}
    text = json.dumps(meta).encode()
    body = struct.pack("<I", len(text)) + text + np.array([1.5, 2.5], "<f4").tobytes()
    got = decode(MAGIC + b"\x01" + zlib.compress(body, 1))
    assert got["step"] == 3 and got["x"].tolist() == [1.5, 2.5]
    with pytest.raises(BadState, match="format"):
        decode(MAGIC + b"\x09" + body)
