"""Run by test_ddp.py under torchrun: one training step of the tiny model on this rank's half
of the global batch; dumps the all-reduced gradients (as the monitor sees them), the loss and
the expert biases after the step."""

import os
import sys

import torch

from model.train import TrainConfig, train


class GradDump:
    def __init__(self):
        self.grads, self.losses, self.bias = {}, [], {}

    def attach(self, model, optimizer):
        self.model = model

    def step_begin(self, step):
        pass

    def before_optimizer(self, step, grad_norm):
        self.grads = {n: p.grad.clone() for n, p in self.model.named_parameters()}
        self.grad_norm = grad_norm.clone()

    def step_end(self, step, loss, **kw):
        self.losses.append(loss.clone())
        self.bias = {i: moe.expert_bias.clone() for i, moe in self.model.moe_layers()}

    def close(self):
        pass


CONFIG = dict(preset="tiny", steps=1, batch_size=4, eval_batches=1, seed=3)


def run() -> GradDump:
    dump = GradDump()
    result = train(TrainConfig(**CONFIG), monitor=dump)
    dump.world_size = result.world_size
    return dump


if __name__ == "__main__":
    torch.set_num_threads(1)
    dump = run()
    torch.save(
        {
            "grads": dump.grads,
            "losses": dump.losses,
            "bias": dump.bias,
            "grad_norm": dump.grad_norm,
            "world_size": dump.world_size,
        },
        os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.pt"),
    )
