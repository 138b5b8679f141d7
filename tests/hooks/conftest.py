"""Fixtures for the client tests: a recording gRPC server on loopback, small models, a loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # importlib mode: make `tests.hooks.*` importable
    sys.path.insert(0, str(ROOT))

from tests.hooks.servicer import LoopbackServer, RecordingServicer  # noqa: E402
from tests.hooks.standin import StandIn  # noqa: E402


@pytest.fixture
def servicer():
    return RecordingServicer()


@pytest.fixture
def server(servicer):
    srv = LoopbackServer(servicer)
    yield srv
    srv.stop()


@pytest.fixture
def standin():
    torch.manual_seed(0)
    return StandIn()


def tiny_model():
    """model/'s tiny preset, or a skip when model/ is not importable."""
    transformer = pytest.importorskip("model.transformer")
    config = pytest.importorskip("model.config")
    torch.manual_seed(0)
    return transformer.MoETransformer(config.get_preset("tiny"))
