"""Each fault switch has its measurable effect on a real (tiny) training run."""

import math

import pytest
import torch

from model.config import get_preset
from model.faults import Blowup, DeadExpert, NanFault, parse_fault
from model.train import TrainConfig, train
from model.transformer import MoETransformer

FAST = dict(preset="tiny", batch_size=4, eval_batches=1)


class ExpertObserver:
    """Per training step: tokens routed to one expert and the RMS of its SwiGLU activations."""

    def __init__(self, layer, expert):
        self.layer, self.expert = layer, expert
        self.tokens, self.act_rms, self.act_maxabs, self.in_step = {}, {}, {}, None

    def attach(self, model, optimizer):
        moe = dict(model.moe_layers())[self.layer]
        moe.router.register_forward_hook(self._route)
        moe.probe_experts.register_forward_hook(self._acts)

    def _route(self, mod, args, out):
        if self.in_step is not None:
            self.tokens[self.in_step] = int((out.topk_idx_TK == self.expert).sum())

    def _acts(self, mod, args, out):
        h_NH, _, expert_N = args
        rows = h_NH[expert_N == self.expert]
        if self.in_step is not None and len(rows):
            self.act_rms[self.in_step] = rows.pow(2).mean().sqrt().item()
            self.act_maxabs[self.in_step] = rows.abs().max().item()

    def step_begin(self, step):
        self.in_step = step

    def before_optimizer(self, step, grad_norm):
        pass

    def step_end(self, step, **kw):
        self.in_step = None

    def close(self):
        pass


def test_parse_defaults_and_options():
    f = parse_fault("blowup@40:layer=3,expert=5,factor=1.3")
    assert isinstance(f, Blowup) and (f.step, f.layer, f.expert, f.factor) == (40, 3, 5, 1.3)
    d = parse_fault("dead-expert@7")
    assert isinstance(d, DeadExpert) and d.layer is None and d.expert == 0
    assert isinstance(parse_fault("nan@2:site=weight"), NanFault)


@pytest.mark.parametrize(
    "spec",
    [
        "meltdown@3",
        "blowup",
        "blowup@-1",
        "blowup@x",
        "blowup@3:factor=0.5",
        "blowup@3:speed=2",
        "lr-spike@3:expert=1",
        "nan@1:site=router",
        "dead-expert@1:expert=abc",
    ],
)
def test_parse_rejects_bad_specs(spec):
    with pytest.raises(ValueError):
        parse_fault(spec)


def test_default_target_is_deepest_moe_layer_and_targets_are_validated():
    torch.manual_seed(0)
    model = MoETransformer(get_preset("tiny"))
    assert parse_fault("blowup@0").target(model)[0] == 4
    with pytest.raises(ValueError, match="not an MoE layer"):
        parse_fault("blowup@0:layer=0").target(model)  # layer 0 is dense
    with pytest.raises(ValueError, match="out of range"):
        parse_fault("blowup@0:expert=8").target(model)


def test_dead_expert_receives_no_tokens():
    obs = ExpertObserver(layer=4, expert=0)
    train(TrainConfig(steps=6, injects=["dead-expert@2"], **FAST), monitor=obs)
    assert obs.tokens[0] > 0 and obs.tokens[1] > 0
    assert [obs.tokens[s] for s in range(2, 6)] == [0, 0, 0, 0]


def test_blowup_grows_the_expert_activation_rms():
    obs = ExpertObserver(layer=2, expert=3)
    train(
        TrainConfig(steps=8, injects=["blowup@2:layer=2,expert=3,factor=1.5"], **FAST), monitor=obs
    )
    first, last = obs.act_rms[1], obs.act_rms[max(obs.act_rms)]
    assert max(obs.act_rms) >= 6 and last > 4 * first
    steps = sorted(s for s in obs.act_rms if s >= 2)
    assert all(obs.act_rms[b] > obs.act_rms[a] for a, b in zip(steps, steps[1:]))


def test_blowup_is_bounded_by_the_clamp():
    L = 0.1

    class Clamped(ExpertObserver):
        def attach(self, model, optimizer):
            super().attach(model, optimizer)
            dict(model.moe_layers())[self.layer].set_clamp("routed", L)

    spec = dict(steps=8, injects=["blowup@2:layer=2,expert=3,factor=1.5"], **FAST)
    free, clamped = ExpertObserver(layer=2, expert=3), Clamped(layer=2, expert=3)
    train(TrainConfig(**spec), monitor=free)
    train(TrainConfig(**spec), monitor=clamped)
    # silu(gate) is clamped from above only (silu >= -0.2785), up to +-L: |h| <= max(L, .2785) L
    assert max(clamped.act_maxabs.values()) <= 0.2785 * L + 1e-7
    assert max(free.act_maxabs.values()) > 2 * 0.2785 * L
    last = max(clamped.act_rms)
    assert clamped.act_rms[last] < free.act_rms[last] / 3


def test_lr_spike_multiplies_the_learning_rate():
    cfg = TrainConfig(steps=6, injects=["lr-spike@2:factor=30,steps=2"], **FAST)
    result = train(cfg)
    expected = [cfg.lr_at(s) * (30 if s in (2, 3) else 1) for s in range(6)]
    assert result.lrs == pytest.approx(expected, rel=1e-12)


def test_nan_activation_makes_one_step_non_finite_and_training_recovers():
    result = train(TrainConfig(steps=5, injects=["nan@2"], **FAST))
    assert math.isnan(result.losses[2]) and math.isnan(result.grad_norms[2])
    assert result.skipped_steps == [2]
    assert all(math.isfinite(result.losses[s]) for s in (0, 1, 3, 4))


def test_nan_weight_poisons_the_model():
    result = train(TrainConfig(steps=4, injects=["nan@1:site=weight"], **FAST))
    assert math.isfinite(result.losses[0])
    assert all(math.isnan(x) for x in result.losses[1:])
    w_down = dict(result.model.moe_layers())[4].experts.w_down
    assert torch.isnan(w_down[0]).any() and not torch.isnan(w_down[1]).any()
