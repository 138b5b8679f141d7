"""Construction: bad configuration fails loudly with a clear message; NullMonitor mirrors
Monitor; rank and world size come from torch.distributed, the environment, or defaults."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
from torch import nn

from hooks import Monitor, MonitorConfig, NullMonitor, StepFlashAdapter, create_monitor
from hooks.monitor import resolve_rank
from tests.hooks.standin import StandIn

QUIET = MonitorConfig(close_timeout_s=0.1)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("param_norm_every", 0, "param_norm_every"),
        ("buffer_steps", -1, "buffer_steps"),
        ("buffer_steps", True, "buffer_steps"),
        ("full_policy", "drop_newest", "full_policy"),
        ("chunk_values", 262_145, "1 MiB"),
        ("block_timeout_s", 0, "block_timeout_s"),
        ("net_timeout_s", float("inf"), "net_timeout_s"),
        ("backoff_max_s", 0.01, "backoff_max_s"),
        ("groups", {"moe", "experts"}, "experts"),
        ("n_mtp_losses", -1, "n_mtp_losses"),
    ],
)
def test_bad_config_values_raise_naming_the_field(field, value, message):
    with pytest.raises(ValueError, match=message):
        MonitorConfig(**{field: value})


def test_config_defaults_and_groups_normalised():
    cfg = MonitorConfig(groups=["moe", "train"])
    assert cfg.groups == frozenset({"moe", "train"})
    assert MonitorConfig().param_norm_every == 10 and MonitorConfig().chunk_values == 262_144
    with pytest.raises(ValueError, match="buffer_steps"):
        dataclasses.replace(cfg, buffer_steps=0)  # a changed copy is validated again


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(target="localhost"), "HOST:PORT"),
        (dict(target="localhost:99999"), "port"),
        (dict(run="has space"), "run name"),
        (dict(rank=2, world_size=2), "rank"),
        (dict(token=""), "token"),
        (dict(config={"param_norm_every": 3}), "MonitorConfig"),
    ],
)
def test_bad_monitor_arguments_raise(kwargs, message):
    args = dict(target="127.0.0.1:9", run="ok", config=QUIET) | kwargs
    with pytest.raises((ValueError, TypeError), match=message):
        Monitor(StandIn(), None, **args)


def test_a_model_no_adapter_fits_is_refused_naming_the_supported_families():
    for attach_later in (False, True):
        mon = Monitor(None, None, target="127.0.0.1:9", run="x", config=QUIET)
        with pytest.raises(TypeError, match="Supported families") as err:
            if attach_later:
                mon.attach(nn.Linear(3, 3))  # attach raises too: training must not start
            else:
                Monitor(nn.Linear(3, 3), None, target="127.0.0.1:9", run="x", config=QUIET)
        for family in ("model/", "Transformers", "torchtitan"):
            assert family in str(err.value)
        mon.close()


def test_step_flash_adapter_finds_the_surface():
    model = StandIn()
    adapter = StepFlashAdapter(model)
    assert [s.layer for s in adapter.moe_sites()] == [1, 2]
    assert [s.shared_probe is not None for s in adapter.moe_sites()] == [False, True]
    assert [(s.layer, s.n_heads) for s in adapter.attention_sites()] == [(0, 4), (1, 2), (2, 4)]
    adapter.set_clamp(2, "routed", 7.0)
    assert adapter.clamp_limit(2, "routed") == 7.0
    with pytest.raises(ValueError, match="not an MoE layer"):
        adapter.set_clamp(0, "routed", 7.0)
    with pytest.raises(ValueError, match="site"):
        adapter.set_clamp(1, "attention", 7.0)


def test_step_flash_adapter_unwraps_a_wrapper():
    class Wrapper(nn.Module):  # the shape of DDP / FSDP: the model under .module
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.module = inner

    model = StandIn()
    assert StepFlashAdapter(Wrapper(model)).model is model


def public_api(cls) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(getattr(cls, name))
        for name in dir(cls)
        if not name.startswith("_") and callable(getattr(cls, name))
    }


def test_null_monitor_has_the_same_public_methods():
    assert public_api(NullMonitor) == public_api(Monitor)
    null = NullMonitor()
    null.attach(StandIn(), None)
    null.step_begin(0)
    null.before_optimizer(0, torch.tensor(1.0))
    null.step_end(0, loss=torch.tensor(1.0), mtp_losses=[], lr=0.1, tokens=3)
    null.close()
    assert null.stats() == {}


@pytest.mark.parametrize("target", [None, "", "off", "OFF", "none"])
def test_factory_returns_null_monitor_when_off(target):
    assert isinstance(create_monitor(StandIn(), target=target, run="x"), NullMonitor)


def test_factory_returns_a_monitor_when_on():
    mon = create_monitor(StandIn(), target="127.0.0.1:9", run="x", config=QUIET)
    assert isinstance(mon, Monitor)
    mon.close()


def test_rank_from_environment_then_defaults(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert resolve_rank(None, None) == (0, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert resolve_rank(None, None) == (3, 4)
    assert resolve_rank(1, None) == (1, 4)
    monkeypatch.setenv("RANK", "x")
    with pytest.raises(ValueError, match="RANK"):
        resolve_rank(None, None)


def test_rank_from_torch_distributed_wins_over_environment(monkeypatch, tmp_path):
    dist = torch.distributed
    if not dist.is_available() or dist.is_initialized():
        pytest.skip("needs torch.distributed and no process group yet")
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert resolve_rank(None, None) == (0, 1)
    finally:
        dist.destroy_process_group()
