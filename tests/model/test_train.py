"""The training loop: learning, monitor call points, LR schedule, bit-identical resume."""

import math
import sys
import types

import pytest
import torch

from model.data import load_corpus, val_batches
from model.train import TrainConfig, evaluate, main, train
from model.transformer import MoETransformer

FAST = dict(preset="tiny", batch_size=4, eval_batches=2)


class RecordingMonitor:
    def __init__(self):
        self.calls = []
        self.model = None

    def attach(self, model, optimizer):
        self.model, self.optimizer = model, optimizer
        self.calls.append(("attach",))

    def step_begin(self, step):
        self.calls.append(("step_begin", step))

    def before_optimizer(self, step, grad_norm):
        # grads must be present (after backward) and not yet clipped
        norm = torch.nn.utils.get_total_norm(
            [p.grad for p in self.model.parameters() if p.grad is not None]
        )
        self.calls.append(("before_optimizer", step, grad_norm, norm))

    def step_end(self, step, loss, mtp_losses, lr, tokens):
        self.calls.append(("step_end", step, loss, mtp_losses, lr, tokens))

    def close(self):
        self.calls.append(("close",))


def test_training_lowers_validation_loss():
    cfg = TrainConfig(steps=30, **FAST)
    torch.manual_seed(cfg.seed)
    untrained = evaluate(
        MoETransformer(cfg.model_config()), val_batches(load_corpus(), 2, 4, 64, cfg.seed)
    )
    assert untrained == pytest.approx(math.log(256), abs=0.1)  # uniform over bytes at init
    result = train(cfg)
    assert result.val_losses[-1][1] < untrained - 1.0
    assert result.losses[-1] < result.losses[0] - 1.0


def test_monitor_call_points_and_exact_loss():
    mon = RecordingMonitor()
    cfg = TrainConfig(steps=3, grad_clip=0.01, **FAST)
    result = train(cfg, monitor=mon)
    kinds = [c[0] for c in mon.calls]
    assert kinds == ["attach"] + ["step_begin", "before_optimizer", "step_end"] * 3 + ["close"]
    assert mon.model is result.model
    for step in range(3):
        _, s, grad_norm, norm_then = mon.calls[2 + 3 * step]
        assert s == step and grad_norm.dim() == 0
        assert torch.equal(grad_norm, norm_then) and grad_norm > 0.01  # seen before clipping
        _, s, loss, mtp, lr, tokens = mon.calls[3 + 3 * step]
        assert s == step and loss.dim() == 0 and not loss.requires_grad
        assert float(loss) == result.losses[step]  # bit for bit
        assert [float(m) for m in mtp] == result.mtp_losses[step] and len(mtp) == 1
        assert lr == result.lrs[step] == cfg.lr_at(step) and tokens == 4 * 64
    assert result.tokens == 3 * 4 * 64 and result.monitor_errors == 0


def test_monitor_errors_never_reach_training():
    class Broken(RecordingMonitor):
        def step_end(self, *args, **kwargs):
            raise RuntimeError("collector down")

    result = train(TrainConfig(steps=2, **FAST), monitor=Broken())
    assert len(result.losses) == 2 and result.monitor_errors == 2


def test_monitor_that_cannot_attach_stops_before_training():
    class NoAttach(RecordingMonitor):
        def attach(self, model, optimizer):
            raise ConnectionError("bad target")

    mon = NoAttach()
    with pytest.raises(ConnectionError):
        train(TrainConfig(steps=2, **FAST), monitor=mon)
    assert mon.calls == [("close",)]  # closed, and no step ran


def test_monitor_without_call_points_is_rejected():
    with pytest.raises(TypeError, match="step_end"):
        train(TrainConfig(steps=1, **FAST), monitor=object())


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    assert cfg.lr_at(0) == pytest.approx(1e-4) and cfg.lr_at(9) == pytest.approx(1e-3)
    assert cfg.lr_at(60) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert cfg.lr_at(110) == pytest.approx(1e-4)
    assert all(cfg.lr_at(s) >= cfg.lr_at(s + 1) for s in range(10, 110))


def test_resume_continues_bit_identically(tmp_path):
    k = 3
    common = dict(steps=2 * k, injects=["blowup@1:factor=1.1"], **FAST)
    straight = train(TrainConfig(**common))
    ckpt = tmp_path / "ckpt.pt"
    first = train(TrainConfig(stop_at=k, checkpoint=str(ckpt), **common))
    second = train(TrainConfig(resume=str(ckpt), **common))
    assert second.start_step == k
    assert first.losses + second.losses == straight.losses  # exact float equality
    assert first.mtp_losses + second.mtp_losses == straight.mtp_losses
    a, b = straight.model.state_dict(), second.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    bias = straight.model.moe_layers()[0][1].expert_bias
    assert bias.abs().sum() > 0  # the aux-loss-free bias state really was carried over


def test_resume_with_other_settings_is_refused(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    train(TrainConfig(steps=2, stop_at=1, checkpoint=str(ckpt), **FAST))
    with pytest.raises(ValueError, match="seed"):
        train(TrainConfig(steps=2, seed=1, resume=str(ckpt), **FAST))
    with pytest.raises(FileNotFoundError):
        train(TrainConfig(steps=2, resume=str(tmp_path / "missing.pt"), **FAST))


@pytest.mark.parametrize(
    "bad",
    [
        dict(steps=0),
        dict(stop_at=5, steps=2),
        dict(lr=0),
        dict(injects=["meltdown@3"]),
        dict(preset="nope"),
    ],
)
def test_bad_train_config(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_cli_writes_metrics(tmp_path, capsys):
    result = main(
        [
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--out",
            str(tmp_path),
            "--log-every",
            "0",
        ]
    )
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"val_loss"' in lines[-1]
    assert (tmp_path / "summary.json").exists() and len(result.losses) == 2


def test_cli_monitor_requires_run():
    with pytest.raises(SystemExit):
        main(["--steps", "1", "--monitor", "127.0.0.1:1"])


def test_cli_monitor_without_hooks_package_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hooks", None)  # makes `from hooks import ...` fail
    with pytest.raises(SystemExit):
        main(["--steps", "1", "--monitor", "127.0.0.1:1", "--run", "r"])
    assert "hooks" in capsys.readouterr().err


def test_cli_monitor_builds_hooks_monitor_at_attach(monkeypatch):
    built = []

    class FakeMonitor(RecordingMonitor):
        def __init__(self, model, optimizer, target, run):
            super().__init__()
            built.append((model, optimizer, target, run))

    monkeypatch.setitem(sys.modules, "hooks", types.SimpleNamespace(Monitor=FakeMonitor))
    result = main(
        [
            "--steps",
            "2",
            "--batch-size",
            "2",
            "--log-every",
            "0",
            "--monitor",
            "127.0.0.1:5555",
            "--run",
            "cli-run",
        ]
    )
    ((model, optimizer, target, run),) = built
    assert model is result.model and isinstance(optimizer, torch.optim.AdamW)
    assert (target, run) == ("127.0.0.1:5555", "cli-run") and result.monitor_errors == 0


def test_cli_monitor_takes_its_secrets_from_files_never_argv(monkeypatch, tmp_path):
    built = []

    class FakeMonitor(RecordingMonitor):
        def __init__(self, model, optimizer, target, run, **secure):
            super().__init__()
            built.append(secure)

    monkeypatch.setitem(sys.modules, "hooks", types.SimpleNamespace(Monitor=FakeMonitor))
    argv = ["--steps", "1", "--batch-size", "2", "--log-every", "0", "--monitor", "h:1"]
    main([*argv, "--run", "r", "--token-file", str(tmp_path / "t"), "--tls-ca", "ca.pem"])
    assert built == [{"token_file": str(tmp_path / "t"), "tls_ca": "ca.pem"}]
    main([*argv, "--run", "r"])  # nothing given: the Monitor's own defaults ($STEPWATCH_TOKEN...)
    assert built[-1] == {}
