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
