"""DDP with two gloo processes (real torchrun) agrees with one process on the same global batch."""

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


def load_worker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("ddp_worker", HERE / "ddp_worker.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # two torchrun workers + a reference run: ~10-25 s on 2 shared cores
@pytest.mark.timeout(180)
def test_two_process_ddp_matches_single_process(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        torchrun = shutil.which("torchrun")
    assert torchrun, "torchrun not found next to the interpreter"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # --standalone: a private rendezvous on a free loopback port
    proc = subprocess.Popen(
        [
            str(torchrun),
            "--standalone",
            "--nproc_per_node=2",
            str(HERE / "ddp_worker.py"),
            str(tmp_path),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )  # own process group: a hang is cleaned up with its workers
    try:
        output, _ = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun hung:\n{output[-3000:]}")
    assert proc.returncode == 0, output[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]

    single = load_worker().run()  # same config, one process, whole global batch
    assert single.world_size == 1
    for name, g in single.grads.items():
        for r in ranks:  # every rank holds the averaged gradient of the global batch
            assert torch.allclose(r["grads"][name], g, rtol=1e-4, atol=1e-7), name
    assert torch.allclose(ranks[0]["grad_norm"], single.grad_norm, rtol=1e-5)
    # each rank's loss is its half of the batch: their mean is the global-batch loss
    mean_loss = (ranks[0]["losses"][0] + ranks[1]["losses"][0]) / 2
    assert torch.allclose(mean_loss, single.losses[0], rtol=1e-5)
    assert not torch.equal(ranks[0]["losses"][0], ranks[1]["losses"][0])  # really disjoint data
    # expert counts are summed over ranks before the sign rule: same biases everywhere
    for layer, bias in single.bias.items():
        assert torch.equal(ranks[0]["bias"][layer], bias) and torch.equal(
            ranks[1]["bias"][layer], bias
        )
