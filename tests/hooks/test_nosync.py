"""No host synchronisation from hooks/ during a step, and exactly one device-to-host copy.

On CPU nothing really synchronises, so the test watches for the operations that would: every
aten op is seen by a TorchDispatchMode, and Python-level conversions are counted by patching
torch.Tensor. Only calls made with a hooks/ frame on the Python stack count (model/ is allowed
its own syncs). A copy whose source is the capture buffer and whose destination is outside it
is a device-to-host transfer of statistics: exactly one per step.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import hooks.stats as stats
from hooks import Monitor, MonitorConfig
from tests.hooks.conftest import tiny_model
from tests.hooks.loop import train_step
from tests.hooks.standin import StandIn

HOOKS_DIR = str(Path(__file__).resolve().parents[2] / "hooks")
SYNC_OPS = {
    "_local_scalar_dense",
    "item",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "bincount",
    "repeat_interleave",
    "equal",
    "is_nonzero",
    "allclose",
}
PY_SYNCS = ("item", "cpu", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")


def from_hooks() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(HOOKS_DIR):
            return True
        frame = frame.f_back
    return False


class SyncWatch(TorchDispatchMode):
    def __init__(self, buf: torch.Tensor) -> None:
        super().__init__()
        self.buf_ptr = buf.untyped_storage().data_ptr()
        self.syncs: list[str] = []
        self.host_copies = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in SYNC_OPS and from_hooks():
            self.syncs.append(name)
        if name in ("copy_", "_to_copy", "clone") and isinstance(args[0], torch.Tensor):
            src = args[1] if name == "copy_" else args[0]
            dst_ptr = args[0].untyped_storage().data_ptr() if name == "copy_" else None
            if src.untyped_storage().data_ptr() == self.buf_ptr and dst_ptr != self.buf_ptr:
                self.host_copies += 1
        return func(*args, **kwargs)


@pytest.fixture
def py_syncs(monkeypatch):
    """Counts Python-level tensor->host conversions made from hooks/ on this thread."""
    calls: list[str] = []
    me = threading.get_ident()
    for name in PY_SYNCS:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *a, _name=name, _orig=original, **k):
            if threading.get_ident() == me and from_hooks():
                calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


@pytest.mark.parametrize("which", ["standin", "tiny"])
def test_no_sync_in_hooks_and_one_host_copy_per_step(which, py_syncs):
    torch.manual_seed(0)
    model, vocab = (StandIn(), 32) if which == "standin" else (tiny_model(), 256)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    mon = Monitor(
        model, opt, target="127.0.0.1:9", run="nosync", config=MonitorConfig(param_norm_every=2)
    )
    mon.sender.close(0.1)
    items: list = []
    mon.sender.submit = items.append
    watch = SyncWatch(mon.capture.buf)
    with watch:
        for step in range(3):  # steps 0 and 2 are periodic: param norms too
            train_step(mon, model, opt, step=step, micro=2, vocab=vocab)
    assert py_syncs == [] and watch.syncs == []
    assert watch.host_copies == 3
    assert mon.stats()["host_copies"] == 3 and mon.stats().get("errors", 0) == 0
    assert len(items) == 3
    mon.close()


def test_watch_detects_a_sync(py_syncs):
    """The watch itself works: a hook that calls .item() is caught."""
    model = StandIn()
    mon = Monitor(model, None, target="127.0.0.1:9", run="nosync")
    mon.sender.close(0.1)
    mon.sender.submit = lambda item: None
    real = stats._maxabs
    watch = SyncWatch(mon.capture.buf)
    try:
        stats._maxabs = lambda x, dim=None: (x.abs().max().item(), real(x, dim))[1]
        with watch:
            mon.step_begin(0)
            model(torch.randint(0, 32, (2, 8)))
            mon.step_end(0, loss=torch.tensor(1.0))
    finally:
        stats._maxabs = real
    assert "item" in py_syncs and "_local_scalar_dense" in watch.syncs
    mon.close()
