"""Stores for the dashboard tests: a real monitored run, and big synthetic runs.

`record_tiny_run` is the real thing (tiny model, Monitor, a `python -m collector serve` child,
Parquet store); `write_synthetic_run` writes rows straight through the store's write API, for
shapes a real run on 2 cores cannot reach (100k steps) and for exact expected values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from store import MetricDict, RunInfo, StepStatus, ValueBatch, open_store

DEAD = (4, 3)  # (layer, expert) the real run kills with model/'s dead-expert fault
DEAD_FROM = 3  # ... from this step on


DEAD_INJECT = f"dead-expert@{DEAD_FROM}:layer={DEAD[0]},expert={DEAD[1]}"


def record_tiny_runs(store_dir: Path, runs: dict[str, dict]) -> str:
    """Train the tiny preset once per entry of `runs` (name -> TrainConfig overrides, e.g.
    steps, seed, injects) through one real collector; returns the store URL."""
    from collector.process import start_collector, stop_collector
    from hooks import Monitor
    from model.monitoring import DeferredMonitor
    from model.train import TrainConfig, train

    url = f"parquet:{store_dir}"
    proc, address = start_collector(
        url,
        "--insecure",
        "--flush-interval",
        "0.1",
        log_path=Path(store_dir).parent / "collector.log",
    )
    try:
        for run, overrides in runs.items():
            cfg = TrainConfig(**{"preset": "tiny", "batch_size": 4, **overrides})
            result = train(
                cfg,
                monitor=DeferredMonitor(
                    lambda m, o, run=run: Monitor(m, o, target=address, run=run)
                ),
            )
            assert result.monitor_errors == 0
    finally:
        code = stop_collector(proc)  # flushes the store and finishes the runs
    assert code == 0, f"collector exited with {code}"
    return url


def synthetic_dict(layers: tuple[int, ...], experts: int) -> MetricDict:
    """train/loss, train/lr, grad/global_norm, and tokens/act_rms/out_norm per (layer, expert)."""
    names, layer, expert, stat = (
        ["train/loss", "train/lr", "grad/global_norm"],
        [-1] * 3,
        [-1] * 3,
        ["loss", "lr", "global_norm"],
    )
    for lay in layers:
        for e in range(experts):
            for s in ("tokens", "act_rms", "out_norm"):
                names.append(f"moe/layer{lay:02d}/expert{e:03d}/{s}")
                layer.append(lay), expert.append(e), stat.append(s)
    n = len(names)
    return MetricDict(
        metric_id=np.arange(n, dtype=np.int32),
        name=names,
        layer=np.asarray(layer, np.int32),
        expert=np.asarray(expert, np.int32),
        head=np.full(n, -1, np.int32),
        stat=stat,
        unit=[""] * n,
        reduce=["mean"] * n,
    )


def synthetic_values(steps: np.ndarray, n_metrics: int, seed: int = 0) -> np.ndarray:
    """[len(steps), n_metrics] float32: a decaying loss with noise, positive stats elsewhere."""
    rng = np.random.default_rng(seed)
    v = rng.uniform(0.5, 1.5, size=(steps.size, n_metrics)).astype(np.float32)
    v[:, 0] = 3.0 * np.exp(-steps / 20_000.0) + 0.05 * rng.standard_normal(steps.size)
    v[:, 1] = 1e-3
    return v


def _open_for_writing(url: str):
    """Parquet without fsync (a test's temp dir need not survive power loss; 10x faster)."""
    if url.startswith("parquet:"):
        from store.parquet import ParquetStore

        return ParquetStore(url.removeprefix("parquet:"), fsync=False)
    return open_store(url)


def write_synthetic_run(
    url: str,
    run: str,
    steps: int,
    *,
    start: int = 0,
    layers: tuple[int, ...] = (1, 2),
    experts: int = 4,
    chunk: int = 10_000,
    finished: bool = True,
    spike: tuple[int, float] | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Write steps [start, steps) of a synthetic run in chunks of `chunk` steps (one flush
    each, as a collector would); returns the [steps, n_metrics] values of the whole run (the
    same for every call with the same seed). `spike=(step, value)` sets the loss at one step."""
    md = synthetic_dict(layers, experts)
    n = md.metric_id.size
    all_steps = np.arange(steps, dtype=np.int64)
    values = synthetic_values(all_steps, n, seed)
    if spike is not None:
        values[spike[0], 0] = spike[1]
    with _open_for_writing(url) as store:
        store.open_run(RunInfo(run=run, world_size=2, started_at=1_700_000_000.0))
        store.write_metrics(run, md)
        for lo in range(start, steps, chunk):
            s = all_steps[lo : min(lo + chunk, steps)]
            store.write_reduced(
                run,
                ValueBatch(
                    step=np.repeat(s, n),
                    metric_id=np.tile(md.metric_id, s.size),
                    value=values[s].reshape(-1),
                    n_ranks=np.full(s.size * n, 2, np.int32),
                ),
            )
            store.write_steps(run, [StepStatus(step=int(i), n_ranks=2) for i in s])
            store.flush()
        if finished:
            store.finish_run(run)
    return values
