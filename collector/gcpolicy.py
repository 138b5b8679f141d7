"""The cyclic garbage collector's schedule in the collector's long-running processes.

A collector allocates a few short-lived objects per frame (protobuf views, tuples, numpy
headers) and holds a large, steady heap (runs, acks, dictionaries, detector state). With
CPython's default schedule (a generation-0 pass every 700 net allocations) the collector at
4,096 streams x 1,460 metrics spent ~1/4 of its CPU in the cyclic collector: 4.6 s over a
16-step `benchmarks.ingest` run, 1,490 generation-0 and 12 full passes over its ~107 k
tracked objects. Once serving, what start-up allocated is frozen (never scanned again) and
generation-0 passes run every 50,000 net allocations, a full pass every 10 M (reference
counting still frees every acyclic object at once; cycles wait a little longer). With full
passes rarer still (50,000 / 50 / 100) the same run spent 0.5 s and the collector's CPU per
step fell 901 -> 633 ms (benchmarks/ingest.py, 2026-12-01); these thresholds collect
long-lived cycles sooner, at 4,096 streams and 32 steps in flight 1.57 -> 1.71 steps/s.
Only the collector's own processes (serve, its workers, the coordinator, the node agent) do
this; the hooks never touch a training process's collector.
"""

from __future__ import annotations

import gc

THRESHOLDS = (50_000, 20, 10)


def tune() -> None:
    """Freeze the start-up heap and space the passes out (see the module docstring)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
