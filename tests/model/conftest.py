"""Shared fixtures for the model tests: the tiny preset, built deterministically."""

import pytest
import torch

from model.config import get_preset
from model.transformer import MoETransformer


@pytest.fixture
def tiny_cfg():
    return get_preset("tiny")


@pytest.fixture
def tiny_model(tiny_cfg):
    torch.manual_seed(0)
    return MoETransformer(tiny_cfg)


@pytest.fixture
def tiny_batch(tiny_cfg):
    g = torch.Generator().manual_seed(1)
    seq_BT = torch.randint(0, tiny_cfg.vocab_size, (2, tiny_cfg.max_seq_len + 1), generator=g)
    return seq_BT[:, :-1].contiguous(), seq_BT[:, 1:].contiguous()


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: intra-op threads only add spin-wait overhead on a shared 2-core
    machine (measured ~5x slower per step under load). Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
