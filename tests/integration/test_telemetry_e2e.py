"""The Telemetry path end to end: the tiny model trains with a Monitor attached, through a real
collector process on loopback, into the Parquet store; what is read back equals values computed
independently in the test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from collector.process import start_collector, stop_collector
from hooks import Monitor
from model.monitoring import DeferredMonitor
from model.train import TrainConfig, train
from store import open_store

ROOT = Path(__file__).resolve().parents[2]
STEPS = 6
BATCH = 4


@pytest.fixture
def collector(tmp_path):
    """A real `python -m collector serve` on a free loopback port, Parquet store in tmp."""
    url = f"parquet:{tmp_path / 'store'}"
    proc, address = start_collector(
        url, "--insecure", "--flush-interval", "0.1", log_path=tmp_path / "collector.log"
    )
    yield address, url, proc
    stop_collector(proc)


def stop(proc: subprocess.Popen) -> None:
    assert stop_collector(proc) == 0  # flushes the store and finishes the run


class ExpertRecorder:
    """Independent recomputation: the RMS of one expert's SwiGLU intermediate, per forward."""

    def __init__(self, layer: int, expert: int):
        self.layer, self.expert, self.rms = layer, expert, []

    def attach(self, model) -> None:
        moe = dict(model.moe_layers())[self.layer]

        def hook(mod, args, out):
            if not torch.is_grad_enabled():  # validation forwards are not training steps
                return
            h_NH, _out_ND, idx_N = args
            rows = h_NH[idx_N == self.expert].double()
            self.rms.append(float(rows.pow(2).mean().sqrt()) if rows.numel() else 0.0)

        moe.probe_experts.register_forward_hook(hook)


def test_tiny_run_lands_in_parquet_exactly(collector):
    address, url, proc = collector
    recorder = ExpertRecorder(layer=4, expert=3)
    shapes = {}

    def make(model, optimizer):
        recorder.attach(model)
        shapes["top_k"] = model.cfg.top_k
        shapes["moe_layers"] = [i for i, _ in model.moe_layers()]
        return Monitor(model, optimizer, target=address, run="e2e")

    cfg = TrainConfig(preset="tiny", steps=STEPS, batch_size=BATCH, seed=3)
    result = train(cfg, monitor=DeferredMonitor(make))
    assert result.monitor_errors == 0
    # Monitor.close() said goodbye: the run is finished while the collector keeps serving
    with open_store(url) as live_reader:
        assert live_reader.runs().filter(run="e2e")["status"].to_list() == ["finished"]
    stop(proc)

    with open_store(url) as store:
        runs = store.runs()
        assert runs["run"].to_list() == ["e2e"] and runs["world_size"][0] == 1
        steps = store.steps("e2e")
        assert steps["step"].to_list() == list(range(STEPS))
        assert steps["complete"].all()

        # the loss series equals the loop's own losses bit for bit (both float32)
        loss = store.series("e2e", "train/loss")
        assert loss["step"].to_list() == list(range(STEPS))
        np.testing.assert_array_equal(
            loss["value"].to_numpy(), np.asarray(result.losses, dtype=np.float32)
        )
        raw = store.series("e2e", "train/loss", rank=0)
        np.testing.assert_array_equal(raw["value"].to_numpy(), loss["value"].to_numpy())

        # token counts per MoE layer sum to tokens x top-k at every step
        seq_len = cfg.model_config().max_seq_len if cfg.seq_len is None else cfg.seq_len
        for step in range(STEPS):
            tokens = store.at_step("e2e", step, "moe/*/expert*/tokens")
            per_layer = tokens.group_by("layer").agg(pl.col("value").sum())
            assert sorted(per_layer["layer"].to_list()) == shapes["moe_layers"]
            assert set(per_layer["value"].to_list()) == {BATCH * seq_len * shapes["top_k"]}

        # a known expert's activation RMS equals the independent recomputation
        name = f"moe/layer{recorder.layer:02d}/expert{recorder.expert:03d}/act_rms"
        rms = store.series("e2e", name)["value"].to_numpy()
        assert len(recorder.rms) == STEPS
        np.testing.assert_allclose(rms, np.asarray(recorder.rms), rtol=1e-5)
        assert (rms > 0).all()

        # learning rate and grad norm land too
        lr = store.series("e2e", "train/lr")["value"].to_numpy()
        np.testing.assert_allclose(lr, [cfg.lr_at(s) for s in range(STEPS)], rtol=1e-6)
        gnorm = store.series("e2e", "grad/global_norm")["value"].to_numpy()
        np.testing.assert_allclose(
            gnorm, np.asarray(result.grad_norms, dtype=np.float32), rtol=1e-6
        )


@pytest.mark.slow
def test_torchrun_two_ranks_raw_and_reduced(collector, tmp_path):
    address, url, proc = collector
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--standalone",
            "-m",
            "model.train",
            "--",  # torchrun would eat --monitor
            "--preset",
            "tiny",
            "--steps",
            str(STEPS),
            "--batch-size",
            str(BATCH),
            "--monitor",
            address,
            "--run",
            "ddp",
            "--out",
            str(out),
            "--threads",
            "1",
        ],
        cwd=ROOT,
        env=env,
        check=True,
        timeout=300,
    )
    stop(proc)
    losses = {r: json.loads((out / f"losses.rank{r}.json").read_text()) for r in (0, 1)}

    with open_store(url) as store:
        assert store.runs().filter(run="ddp")["world_size"][0] == 2
        steps = store.steps("ddp")
        assert steps["n_ranks"].to_list() == [2] * STEPS and steps["complete"].all()
        for r in (0, 1):
            raw = store.series("ddp", "train/loss", rank=r)["value"].to_numpy()
            np.testing.assert_array_equal(raw, np.asarray(losses[r], dtype=np.float32))
        reduced = store.series("ddp", "train/loss")["value"].to_numpy()
        expected = (np.asarray(losses[0], np.float32) + np.asarray(losses[1], np.float32)) / 2
        np.testing.assert_allclose(reduced, expected, rtol=1e-6)

        # tokens reduce by sum: each rank routes its half of the batch
        seq_len = 64
        tok = store.at_step("ddp", STEPS - 1, "moe/*/expert*/tokens")
        per_rank = [store.at_step("ddp", STEPS - 1, "moe/*/expert*/tokens", rank=r) for r in (0, 1)]
        np.testing.assert_array_equal(
            tok["value"].to_numpy(),
            per_rank[0]["value"].to_numpy() + per_rank[1]["value"].to_numpy(),
        )
        assert tok.group_by("layer").agg(pl.col("value").sum())["value"].unique().to_list() == [
            BATCH * seq_len * 2
        ]  # tiny: top-2

        # act_rms reduces as mean_nonzero: the mean over the ranks that routed the expert any
        # token (a rank that routed it none reports 0), not their mean divided by the world
        rms = [
            store.at_step("ddp", STEPS - 1, "moe/*/expert*/act_rms", rank=r)["value"].to_numpy()
            for r in (0, 1)
        ]
        fed = (rms[0] != 0).astype(int) + (rms[1] != 0)
        np.testing.assert_allclose(
            store.at_step("ddp", STEPS - 1, "moe/*/expert*/act_rms")["value"].to_numpy(),
            (rms[0].astype(np.float64) + rms[1]) / np.maximum(fed, 1),
            rtol=1e-6,
        )
        ops = store.metrics("ddp").filter(stat="act_rms")
        routed = ops.filter(pl.col("expert") >= 0)["reduce"]  # the shared expert sees every token
        assert routed.len() > 0 and (routed == "mean_nonzero").all()
        assert (ops.filter(pl.col("expert") < 0)["reduce"] == "mean").all()

        # max-reduced metrics are the max over ranks
        mx = store.at_step("ddp", 2, "resid/*/maxabs")
        r0 = store.at_step("ddp", 2, "resid/*/maxabs", rank=0)["value"].to_numpy()
        r1 = store.at_step("ddp", 2, "resid/*/maxabs", rank=1)["value"].to_numpy()
        np.testing.assert_array_equal(mx["value"].to_numpy(), np.maximum(r0, r1))


def _run_rank(
    rank: int, address: str, steps: int, stall_at: int | None, stall_s: float, losses: dict
) -> None:
    """One simulated rank of a 2-rank run: a real tiny model, a real Monitor, a plain loop."""
    from model.config import get_preset
    from model.transformer import MoETransformer

    torch.manual_seed(rank)
    model = MoETransformer(get_preset("tiny"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = Monitor(model, opt, target=address, run="strag", rank=rank, world_size=2)
    gen = torch.Generator().manual_seed(100 + rank)
    losses[rank] = []
    for step in range(steps):
        mon.step_begin(step)
        x = torch.randint(0, 256, (2, 33), generator=gen)
        out = model(x[:, :-1], x[:, 1:])
        out.loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        mon.before_optimizer(step, gnorm)
        opt.step()
        opt.zero_grad()
        if step == stall_at:
            time.sleep(stall_s)  # this rank stalls past the straggler timeout
        loss = out.main_loss.detach()
        losses[rank].append(float(loss))
        mon.step_end(step, loss=loss, mtp_losses=[], lr=1e-3, tokens=x.numel())
    mon.close()


def test_straggler_is_reduced_without_and_marked(tmp_path):
    url = f"parquet:{tmp_path / 'store'}"
    proc, address = start_collector(
        url,
        "--insecure",
        "--straggler-timeout",
        "2.0",
        "--flush-interval",
        "0.1",
        log_path=tmp_path / "collector.log",
    )
    losses: dict = {}
    try:
        threads = [
            threading.Thread(target=_run_rank, args=(r, address, 4, 2 if r else None, 6.0, losses))
            for r in (0, 1)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        stop(proc)

    with open_store(url) as store:
        steps = store.steps("strag").sort("step")
        assert steps["step"].to_list() == [0, 1, 2, 3]
        assert steps["complete"].to_list()[:2] == [True, True]
        late = steps.filter(step=2).row(0, named=True)
        assert late["complete"] is False and list(late["missing_ranks"]) == [1]
        assert late["n_ranks"] == 1
        # the reduction of the straggling step is rank 0's alone ...
        reduced = store.series("strag", "train/loss")
        assert reduced.filter(step=2)["value"][0] == np.float32(losses[0][2])
        # ... and the late rank's values are still recorded as raw rows
        raw1 = store.series("strag", "train/loss", rank=1)
        assert raw1["step"].to_list() == [0, 1, 2, 3]
        np.testing.assert_array_equal(
            raw1["value"].to_numpy(), np.asarray(losses[1], dtype=np.float32)
        )


def test_large_schema_travels_as_several_wire_schemas(collector, monkeypatch):
    """A flash-sized rank has ~10^5 metrics; one Schema message of that size would be refused.
    With the cut lowered to 2,500 bytes of MetricDefs (~50 metrics), the tiny model's ~280
    travel as several wire schemas and every value still lands under its own name."""
    import hooks.schemas

    monkeypatch.setattr(hooks.schemas, "SCHEMA_PART_BYTES", 2_500)
    address, url, proc = collector
    probe = {}

    def make(model, optimizer):
        mon = Monitor(model, optimizer, target=address, run="split")
        probe["names"] = [s.name for s in mon.layout.step_specs]
        assert mon.sender is not None
        probe["parts"] = mon.sender._schemas
        return mon

    result = train(
        TrainConfig(preset="tiny", steps=3, batch_size=BATCH, seed=1), monitor=DeferredMonitor(make)
    )
    assert result.monitor_errors == 0
    stop(proc)
    assert len(probe["names"]) > 5 * 50  # really split into several parts
    assert len(probe["parts"]) > 5
    with open_store(url) as store:
        stored = store.at_step("split", 2)
        assert set(probe["names"]) <= set(stored["name"].to_list())
        loss = store.series("split", "train/loss")["value"].to_numpy()
        np.testing.assert_array_equal(loss, np.asarray(result.losses, dtype=np.float32))
        lr = store.series("split", "train/lr")["value"].to_numpy()
        np.testing.assert_allclose(
            lr, [TrainConfig(preset="tiny", steps=3).lr_at(s) for s in range(3)], rtol=1e-6
        )
