"""The statistics are right: every metric against an independent recomputation (recompute.py)
on the stand-in and on model/'s tiny preset, including gradient accumulation, activation
checkpointing, step reset, periodic parameter norms and the update ratio. The tests marked
with the `forms` fixture run twice: with the CPU's kernels and with the fused ones an
accelerator takes (hooks.stats._fused), so CI, which has no GPU, checks both."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hooks.stats
from hooks import Monitor, MonitorConfig
from hooks.layout import PERIODIC_SCHEMA_ID, RegionKey
from tests.hooks.conftest import tiny_model
from tests.hooks.loop import train_step
from tests.hooks.recompute import Recorder
from tests.hooks.standin import StandIn

DEAD = "127.0.0.1:9"  # nothing listens: these tests read the step vectors before the sender


@pytest.fixture(params=["cpu kernels", "fused kernels"])
def forms(request, monkeypatch):
    """Both forms of the hooks' kernels on CPU tensors (the fused one is CUDA's default)."""
    if request.param == "fused kernels":
        monkeypatch.setattr(hooks.stats, "_fused", lambda x: True)
    return request.param


def offline_monitor(model, opt, **config) -> tuple[Monitor, list]:
    """A Monitor whose steps are collected in a list instead of sent."""
    mon = Monitor(model, opt, target=DEAD, run="stats", config=MonitorConfig(**config))
    mon.sender.close(0.1)
    items: list = []
    mon.sender.submit = items.append
    return mon, items


def by_name(mon: Monitor, item) -> dict[str, float]:
    specs = list(mon.layout.step_specs)
    if any(sid == PERIODIC_SCHEMA_ID for sid, _ in item.schemas):
        specs += mon.layout.periodic_specs
    values = item.values()
    assert len(values) == len(specs)
    return {s.name: float(v) for s, v in zip(specs, values)}


def assert_matches(got: dict[str, float], want: dict[str, float]) -> None:
    missing = sorted(set(want) - set(got))
    assert not missing, f"metrics not sent: {missing[:5]}"
    names = sorted(want)
    np.testing.assert_allclose(
        [got[n] for n in names], [want[n] for n in names], rtol=2e-5, atol=1e-6, err_msg=str(names)
    )


@pytest.mark.parametrize("which", ["standin", "tiny"])
def test_every_stat_matches_recomputation_with_grad_accumulation(which, forms):
    torch.manual_seed(0)
    model, vocab = (StandIn(), 32) if which == "standin" else (tiny_model(), 256)
    for _, moe in model.moe_layers():  # a nonzero bias to measure
        moe.expert_bias.copy_(torch.linspace(-0.3, 0.2, moe.n_experts))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon, items = offline_monitor(model, opt)
    rec = Recorder(model)
    out = train_step(mon, model, opt, step=3, micro=3, vocab=vocab, before_step=rec.snapshot_grads)
    got = by_name(mon, items[-1])
    want = rec.expected()
    want["grad/global_norm"] = float(out.grad_norm)
    assert_matches(got, want)
    for l, moe in model.moe_layers():  # every assignment counted exactly once
        total = sum(got[f"moe/layer{l:02d}/expert{e:03d}/tokens"] for e in range(moe.n_experts))
        assert total == 3 * 2 * 8 * moe.top_k
    # train/loss is the float32 of the loss tensor, bit for bit; host values as given
    assert np.float32(got["train/loss"]).tobytes() == np.float32(float(out.loss)).tobytes()
    assert got["train/lr"] == pytest.approx(0.01) and got["train/tokens"] == 48
    assert got["train/step_time"] > 0 and got["train/tokens_per_s"] == pytest.approx(
        48 / got["train/step_time"], rel=1e-5
    )
    for d, m in enumerate(out.mtp, start=1):
        assert got[f"train/mtp_loss/{d}"] == np.float32(float(m))
    mon.close()


def test_step_reset_and_window(forms):
    """A new step starts from zero, and forwards outside step_begin..step_end are ignored."""
    torch.manual_seed(1)
    model = StandIn()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon, items = offline_monitor(model, opt)
    train_step(mon, model, opt, step=0, micro=2)
    model(torch.randint(0, 32, (4, 8)))  # an eval forward between steps
    rec = Recorder(model)
    train_step(mon, model, opt, step=1, before_step=rec.snapshot_grads)
    got = by_name(mon, items[1])
    assert_matches(got, rec.expected())
    assert sum(got[f"moe/layer01/expert{e:03d}/tokens"] for e in range(4)) == 2 * 8 * 2
    mon.close()


def test_activation_checkpointing_does_not_double_count(forms):
    torch.manual_seed(2)
    model = StandIn(checkpoint=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    mon, items = offline_monitor(model, opt)
    rec = Recorder(model)
    train_step(mon, model, opt, step=0)
    got = by_name(mon, items[0])
    assert sum(got[f"moe/layer02/expert{e:03d}/tokens"] for e in range(4)) == 2 * 8 * 2
    rec.router = {l: v[: len(v) // 2] for l, v in rec.router.items()}  # recorder saw both
    rec.experts = {l: v[: len(v) // 2] for l, v in rec.experts.items()}
    want = {k: v for k, v in rec.expected().items() if k.startswith("moe/") and "shared" not in k}
    assert_matches(got, want)
    mon.close()


def test_periodic_param_norms_and_update_ratio():
    torch.manual_seed(3)
    model = StandIn()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    mon, items = offline_monitor(model, opt, param_norm_every=2)
    before = {}
    snap = lambda: before.update(
        {n: p.detach().clone().double() for n, p in model.named_parameters()}
    )
    for step in range(3):
        train_step(mon, model, opt, step=step, lr=0.05, before_step=snap)
        if step == 2:
            after = {n: p.detach().double() for n, p in model.named_parameters()}
    assert [sid for sid, _ in items[0].schemas] == [1, 2]
    assert [sid for sid, _ in items[1].schemas] == [1]  # not a multiple of K
    assert len(items[1].values()) == mon.layout.n_step
    got = by_name(mon, items[2])
    delta = math.sqrt(sum(float((after[n] - before[n]).pow(2).sum()) for n in before))
    norm = math.sqrt(sum(float(before[n].pow(2).sum()) for n in before))
    assert got["optim/update_ratio"] == pytest.approx(delta / norm, rel=1e-4)
    assert got["optim/update_ratio"] > 0
    for l, moe in model.moe_layers():
        w = moe.experts
        for e in range(moe.n_experts):
            want = math.sqrt(
                sum(
                    float(t[e].detach().double().pow(2).sum()) for t in (w.w_gate, w.w_up, w.w_down)
                )
            )
            assert got[f"params/layer{l:02d}/expert{e:03d}/fro_norm"] == pytest.approx(
                want, rel=1e-5
            )
    mon.close()


def test_disabled_groups_install_nothing_and_send_nothing():
    model = StandIn()
    mon, items = offline_monitor(model, None, groups={"train", "grad"})
    assert not any(b.attn.probe_logits.active for b in model.layers)
    assert not any(moe.probe_experts.active for _, moe in model.moe_layers())
    names = {s.name for s in mon.layout.step_specs + mon.layout.periodic_specs}
    assert names and all(n.startswith(("train/", "grad/", "telemetry/")) for n in names)
    mon.close()
    assert not model.lm_head._forward_hooks  # close removes every hook


def test_non_finite_values_reach_the_vector(forms):
    """A blow-up must be visible: NaN in an expert's weights shows in its stats, not hidden,
    and stays there: the other experts of the layer see the same finite input."""
    torch.manual_seed(4)
    model = StandIn()
    moe = model.layers[1].ffn
    with torch.no_grad():
        moe.experts.w_up[0].fill_(float("nan"))
        moe.router.expert_bias[0] = 10.0  # scores are in (0, 1): every token picks expert 0
    mon, items = offline_monitor(model, None)
    mon.step_begin(0)
    model(torch.randint(0, 32, (2, 8)))
    mon.step_end(0, loss=torch.tensor(1.0))
    got = by_name(mon, items[0])
    assert got["moe/layer01/expert000/tokens"] == 2 * 8
    assert math.isnan(got["moe/layer01/expert000/act_rms"])
    assert math.isnan(got["moe/layer01/expert000/act_maxabs"])
    assert math.isnan(got["moe/layer01/expert000/out_norm"])
    others = [got[f"moe/layer01/expert{e:03d}/tokens"] for e in range(1, 4)]
    assert sum(others) == 2 * 8 * (moe.top_k - 1)  # the second choice of every token
    for e in range(1, 4):
        assert math.isfinite(got[f"moe/layer01/expert{e:03d}/act_rms"])
        assert math.isfinite(got[f"moe/layer01/expert{e:03d}/act_maxabs"])
    mon.close()


def test_a_misspelled_region_key_raises_and_a_disabled_one_is_none():
    mon, _ = offline_monitor(StandIn(), None, groups={"train", "moe"})
    assert mon.capture.view(RegionKey.MOE_ACT_RMS) is not None
    assert mon.capture.view("moe.act_rms") is not None  # the key is the string
    assert mon.capture.view(RegionKey.ATTN_MAX_LOGIT) is None  # known, its group is off
    for typo in ("moe.act_rsm", "moe/layer01/expert000/act_rms", "attn.max_logits", ""):
        with pytest.raises(KeyError, match="not a buffer region"):
            mon.capture.view(typo)
        with pytest.raises(KeyError, match="not a buffer region"):
            mon.layout.region(typo)
    mon.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_maxabs_is_the_largest_magnitude_of_either_sign_and_keeps_nan(dtype, forms):
    from hooks.stats import _maxabs

    x = torch.tensor([[0.5, -3.0, 2.0], [1.0, 0.25, -0.5]], dtype=dtype)
    assert _maxabs(x).dtype == torch.float32 and _maxabs(x).item() == 3.0  # the negative one
    assert _maxabs(-x).item() == 3.0
    assert _maxabs(x, 1).tolist() == [3.0, 1.0]
    assert _maxabs(torch.zeros(0, 3, dtype=dtype)).item() == 0.0
    x[1, 1] = float("nan")
    assert math.isnan(_maxabs(x).item())
    x[1, 1] = float("-inf")
    assert _maxabs(x).item() == math.inf
