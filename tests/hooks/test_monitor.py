"""The Monitor end to end over a loopback gRPC server: steps arrive, clip updates are staged and
applied at the next step boundary and acknowledged with that step, a dead collector or a broken
hook never reaches the training loop, and monitoring does not change training."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from hooks import Monitor, MonitorConfig, NullMonitor
from hooks.layout import RegionKey
from tests.hooks.conftest import tiny_model
from tests.hooks.loop import forward_loss, train_step
from tests.hooks.servicer import wait_until
from tests.hooks.standin import StandIn

pytestmark = pytest.mark.timeout(120)
FAST = dict(backoff_initial_s=0.05, backoff_max_s=0.2, close_timeout_s=10)


def test_steps_arrive_with_their_schema(server, servicer):
    torch.manual_seed(0)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    mon = Monitor(
        model,
        opt,
        target=server.target,
        run="e2e",
        rank=0,
        world_size=1,
        config=MonitorConfig(param_norm_every=2, **FAST),
    )
    outs = [train_step(mon, model, opt, step=s, vocab=256) for s in range(3)]
    mon.close()
    stats = mon.stats()
    assert stats["steps_sent"] == 3 and stats["buffered_steps"] == 0 and stats.get("errors", 0) == 0
    schemas = {f.schema.schema_id: f.schema for f in servicer.frames("schema")}
    names = [m.name for m in schemas[1].metrics]
    assert names == [s.name for s in mon.layout.step_specs]
    assert "moe/layer01/expert007/act_rms" in names and "attn/layer01/head05/max_logit" in names
    assert [m.name for m in schemas[2].metrics][-1] == "optim/update_ratio"
    vectors = servicer.step_vectors(1)
    assert sorted(vectors) == [0, 1, 2]
    i = names.index("train/loss")
    assert [vectors[s][i] for s in range(3)] == [np.float32(float(o.loss)) for o in outs]
    assert sorted(servicer.step_vectors(2)) == [0, 2]  # periodic schema, K = 2
    ends = servicer.frames("end_of_step")
    assert [e.end_of_step.n_values for e in ends] == [
        mon.layout.n_step + mon.layout.n_periodic,
        mon.layout.n_step,
        mon.layout.n_step + mon.layout.n_periodic,
    ]


def test_clip_update_is_staged_applied_at_next_step_begin_and_acked(server, servicer):
    torch.manual_seed(0)
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    mon = Monitor(model, opt, target=server.target, run="clip", config=MonitorConfig(**FAST))
    train_step(mon, model, opt, step=0, vocab=256)
    assert servicer.wait_for(lambda s: len(s.frames("end_of_step")) == 1)
    moe1 = dict(model.moe_layers())[1]
    moe1.set_clamp("shared", 3.0)
    servicer.push_clip(5, [(1, "routed", 7.0), (1, "shared", 0.0), (2, "routed", 9.5)])
    assert wait_until(lambda: mon.stats().get("clip_updates_staged") == 1)
    assert moe1.clamp_limit("routed") is None  # staged, not applied mid-step
    mon.step_begin(1)
    assert moe1.clamp_limit("routed") == 7.0
    assert moe1.clamp_limit("shared") is None  # limit <= 0 switches the clamp off
    assert dict(model.moe_layers())[2].clamp_limit("routed") == 9.5
    mon.step_end(1, loss=torch.tensor(1.0))
    servicer.push_clip(5, [(1, "routed", 7.0)])  # the same version again: re-acked only
    servicer.push_clip(6, [(99, "routed", 1.0), (2, "routed", 4.0)])  # one bad setting
    assert wait_until(lambda: mon.stats().get("clip_updates_staged") == 3)
    mon.step_begin(2)
    assert dict(model.moe_layers())[2].clamp_limit("routed") == 4.0
    mon.step_end(2, loss=torch.tensor(1.0))
    mon.close()
    acks = [(f.clip_ack.version, f.clip_ack.header.step) for f in servicer.frames("clip_ack")]
    assert acks == [(5, 1), (5, 1), (6, 2)]
    stats = mon.stats()
    assert stats["clip_version"] == 6 and stats["clip_updates_applied"] == 2
    assert stats["errors_clip_setting"] == 1


def test_dead_collector_and_broken_telemetry_never_reach_the_loop(servicer):
    """Nothing listens, a hook raises, the loop passes nonsense: training goes on."""
    model = StandIn()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon = Monitor(
        model,
        opt,
        target="127.0.0.1:9",
        run="down",
        config=MonitorConfig(
            buffer_steps=2,
            close_timeout_s=0.2,
            **{k: v for k, v in FAST.items() if k != "close_timeout_s"},
        ),
    )
    for step in range(4):
        train_step(mon, model, opt, step=step)
    mon.adapter.decode_router = lambda out: 1 / 0  # every router hook now fails
    train_step(mon, model, opt, step=4)
    mon.step_begin(5)
    mon.before_optimizer(5, grad_norm=object())
    mon.step_end(5, loss="not a tensor", mtp_losses=[object()], lr="x", tokens=None)
    mon.step_end(6, loss=torch.tensor(1.0))  # no step_begin(6): not sent
    mon.close()
    mon.close()  # twice is fine
    stats = mon.stats()
    assert stats["steps"] == 5 and stats["dropped_steps"] == 3
    assert stats["errors_hook"] == 2 and stats["errors_step_end"] == 1
    assert stats["errors_before_optimizer"] == 1 and stats["lost_at_close"] == 2
    assert stats["step_end_without_begin"] == 1
    assert stats["connect_failures"] >= 1


def test_monitoring_does_not_change_training():
    """Same seed, with and without the monitor: bit-identical parameters after 3 steps."""

    def run(monitor_on: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = tiny_model()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        mon = NullMonitor()
        if monitor_on:
            mon = Monitor(
                model,
                opt,
                target="127.0.0.1:9",
                run="same",
                config=MonitorConfig(param_norm_every=1, close_timeout_s=0.1),
            )
        for step in range(3):
            train_step(mon, model, opt, step=step, vocab=256)
        mon.close()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(False), run(True)):
        assert torch.equal(a, b)


def test_attach_is_idempotent_and_refuses_a_second_model():
    model = StandIn()
    mon = Monitor(
        model, None, target="127.0.0.1:9", run="att", config=MonitorConfig(close_timeout_s=0.1)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    mon.attach(model, opt)  # what model/train.py's loop does
    assert mon.optimizer is opt and len(model.lm_head._forward_hooks) == 1
    with pytest.raises(ValueError, match="already attached"):
        mon.attach(StandIn(), opt)  # a bug in the caller, before step 0: raised
    mon.step_end(0, loss=torch.tensor(2.0))  # lr taken from the optimizer
    mon.close()


def test_model_train_loop_drives_the_monitor(server, servicer, tmp_path):
    """model/train.py's own loop (attach, call points, close) streams every step."""
    train = pytest.importorskip("model.train")
    mon = Monitor(None, target=server.target, run="loop", config=MonitorConfig(**FAST))
    cfg = train.TrainConfig(
        preset="tiny", steps=3, batch_size=2, seq_len=16, eval_every=0, log_every=0
    )
    result = train.train(cfg, monitor=mon)
    assert result.monitor_errors == 0 and mon.stats().get("errors", 0) == 0
    vectors = servicer.step_vectors(1)
    assert sorted(vectors) == [0, 1, 2]
    i = [s.name for s in mon.layout.step_specs].index("train/loss")
    assert [float(vectors[s][i]) for s in range(3)] == [float(np.float32(x)) for x in result.losses]


def test_missing_mtp_losses_are_said_once(server, caplog):
    torch.manual_seed(0)
    model = tiny_model()
    mon = Monitor(model, target=server.target, run="mtp", config=MonitorConfig(**FAST))
    n_mtp = mon.layout.region(RegionKey.TRAIN_MTP).size
    assert n_mtp > 0  # the tiny model has MTP heads
    with caplog.at_level(logging.INFO, logger="stepwatch"):
        for s in range(3):
            mon.step_begin(s)
            loss, _, _ = forward_loss(model, torch.randint(0, 32, (2, 8)))
            loss.backward()
            mon.step_end(s, loss=loss, mtp_losses=[], lr=1e-3)
    mon.close()
    said = [r.getMessage() for r in caplog.records if "MTP loss" in r.getMessage()]
    assert len(said) == 1 and f"for the model's {n_mtp}" in said[0], said
    assert "train/mtp_loss/1.." in said[0] and "n_mtp_losses=0" in said[0]
