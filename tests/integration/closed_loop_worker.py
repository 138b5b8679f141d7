"""Run by test_closed_loop.py under torchrun: one rank of the tiny model with a blow-up
injected, monitored in lockstep against the collector at argv[1] as run argv[2]."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from hooks import Monitor
from model.monitoring import DeferredMonitor
from model.train import TrainConfig, train
from tests.integration.lockstep import Lockstep

if __name__ == "__main__":
    address, run, steps, inject = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    result = train(
        TrainConfig(preset="tiny", steps=steps, batch_size=8, seed=0, injects=[inject]),
        monitor=DeferredMonitor(lambda m, o: Lockstep(Monitor(m, o, target=address, run=run))),
    )
    sys.exit(1 if result.monitor_errors else 0)
