"""The CUDA path: pinned staging buffer, non_blocking copy + event, same numbers as the CPU
recomputation. Skips cleanly without CUDA."""

from __future__ import annotations

import pytest
import torch

from tests.hooks.conftest import tiny_model
from tests.hooks.loop import forward_loss
from tests.hooks.recompute import Recorder
from tests.hooks.test_stats import assert_matches, by_name, offline_monitor

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_capture_matches_recomputation_through_a_pinned_copy():
    model = tiny_model().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    mon, items = offline_monitor(model, opt)
    rec = Recorder(model)
    assert mon.capture.buf.is_cuda
    for step in range(2):  # the second step reuses a pooled pinned buffer
        rec.clear()
        mon.step_begin(step)
        idx = torch.randint(0, 256, (2, 16), device="cuda")
        loss, main, mtp = forward_loss(model, idx)
        loss.backward()
        rec.snapshot_grads()
        grad_norm = torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters() if p.grad is not None]
        )
        mon.before_optimizer(step, grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mon.step_end(
            step, loss=main.detach(), mtp_losses=[m.detach() for m in mtp], lr=1e-2, tokens=32
        )
        assert items[-1].vector._host.is_pinned()
        want = rec.expected()
        want["grad/global_norm"] = float(grad_norm)
        got = by_name(mon, items[-1])
        assert_matches(got, want)
        assert got["train/loss"] == float(main.detach().float())
    assert mon.stats()["host_copies"] == 2
    mon.close()
