"""Store.write_detector_state / detector_state on every backend (memory, Parquet, ClickHouse
18.16 single server and cluster): the blob comes back byte for byte, one per (run, kind), the
last write wins, visible after flush only, and to another store instance where shared."""

from __future__ import annotations

import numpy as np
import pytest

from analytics.state import decode, encode
from store.base import InvalidInput, NotFound, RunInfo, StoreError


def blob(seed: int, n: int = 300_000) -> bytes:
    """Every byte value, NULs included, and incompressible bulk."""
    return bytes(range(256)) + np.random.default_rng(seed).bytes(n)


def test_a_saved_state_comes_back_byte_for_byte_and_the_last_write_wins(store_factory):
    st = store_factory.open()
    try:
        st.open_run(RunInfo("r1", 2))
        st.open_run(RunInfo("r2", 2))
        st.flush()
        assert st.detector_state("r1") is None
        st.write_detector_state("r1", 10, blob(1))
        assert st.detector_state("r1") is None  # not before the flush
        st.flush()
        assert st.detector_state("r1") == (10, blob(1))
        for step in range(20, 220, 20):  # past the Parquet store's compaction fan-out
            st.write_detector_state("r1", step, blob(step))
            st.flush()
        st.write_detector_state("r2", 5, b"")
        st.write_detector_state("r2", 7, b"other kind", kind="policy")
        st.flush()
        assert st.detector_state("r1") == (200, blob(200))
        assert st.detector_state("r2") == (5, b"")
        assert st.detector_state("r2", kind="policy") == (7, b"other kind")
        with pytest.raises(NotFound):
            st.detector_state("never")
        with pytest.raises(InvalidInput):
            st.write_detector_state("r1", -1, b"x")
        with pytest.raises(InvalidInput):
            st.write_detector_state("r1", 1, "text")  # type: ignore[arg-type]
        if store_factory.shared:
            with store_factory.open() as other:
                assert other.detector_state("r1") == (200, blob(200))
    finally:
        st.close()


def test_detector_state_round_trips_through_the_store(store_factory):
    """analytics.state's blob of real state (arrays with NaN, nested lists) through a store."""
    from analytics.detectors import DetectorSet
    from tests.analytics.synthetic import SyntheticRun, blowup

    syn, det = SyntheticRun(seed=2), DetectorSet()
    syn.faults.append(blowup(1, 2, start=70))
    for s in range(60):
        det.observe(syn.frame(s), syn.index)
    state = det.state_dict()
    with store_factory.open() as st:
        st.open_run(RunInfo("r", 1))
        st.write_detector_state("r", 59, encode(state))
        st.flush()
        step, got = st.detector_state("r")
    restored = DetectorSet()
    restored.load_state_dict(decode(got))
    assert step == 59
    seen = []
    for s in range(60, 120):  # the restored set goes on exactly as the original
        f = syn.frame(s)
        a, b = det.observe(f, syn.index), restored.observe(f, syn.index)
        assert [(e.brief(), e.detail) for e in a] == [(e.brief(), e.detail) for e in b], s
        seen += a
    assert "blowup" in {e.kind for e in seen}  # ... through a blow-up it must remember


def test_parquet_keeps_the_blob_as_bytes_and_still_reads_base64_states_of_older_stores(tmp_path):
    """Saved since: raw bytes, uncompressed, under detector_blobs/. A store written before
    holds base64 text under detector_state/: still read, and a newer save of a kind wins."""
    import base64

    import polars as pl
    import pyarrow.parquet as pq

    from store.frames import DETECTOR_STATE_SCHEMA
    from store.parquet import LEGACY_STATE_DIR, STATE_DIR, ParquetStore
    from store.segments import SegmentLog

    with ParquetStore(str(tmp_path)) as st:
        st.open_run(RunInfo("r", 1))
        st.flush()
    old = pl.DataFrame(
        {
            "kind": ["detect", "policy"],
            "step": [40, 41],
            "state": [base64.b64encode(blob(40)).decode(), base64.b64encode(b"p").decode()],
        },
        schema={**DETECTOR_STATE_SCHEMA, "state": pl.Utf8},
    )
    SegmentLog(str(tmp_path / "r" / LEGACY_STATE_DIR), "detector_state").append(old)
    with ParquetStore(str(tmp_path)) as st:
        assert st.detector_state("r") == (40, blob(40))
        assert st.detector_state("r", kind="policy") == (41, b"p")
        st.write_detector_state("r", 50, blob(50))
        st.flush()
        assert st.detector_state("r") == (50, blob(50))  # the newer save wins its kind ...
        assert st.detector_state("r", kind="policy") == (41, b"p")  # ... and only its kind
    (seg,) = (tmp_path / "r" / STATE_DIR).glob("*.parquet")
    meta = pq.ParquetFile(seg).metadata
    col = meta.row_group(0).column(meta.schema.names.index("state"))
    assert col.physical_type == "BYTE_ARRAY" and col.compression == "UNCOMPRESSED"
    assert col.total_uncompressed_size < len(blob(50)) * 1.01  # the bytes, not their base64
    bad = old.with_columns(pl.lit("not base64!").alias("state"))
    SegmentLog(str(tmp_path / "r" / LEGACY_STATE_DIR), "detector_state").append(bad)
    with ParquetStore(str(tmp_path)) as st, pytest.raises(StoreError, match="not base64"):
        st.detector_state("r")
