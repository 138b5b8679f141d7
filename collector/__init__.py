"""stepwatch collector: gRPC server, run/schema registry, end-of-step barrier + reduction,
durable acks, online detectors (analytics/, detect.py) and the clip control loop (control.py;
operator commands via `python -m collector clip`, operator.py). Start it with
`python -m collector serve` or embed `Collector(store, CollectorConfig(...)).start()`.
Scaled out: collectors with `serve --coordinator` (tier.py) and one `coordinate`
(coordinator.py), or `serve --workers N` on one host (workers.py)."""

from collector.clipboard import ClipAckRecord
from collector.config import CollectorConfig
from collector.errors import (
    CollectorError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from collector.server import Collector, serve

__all__ = [
    "ClipAckRecord",
    "Collector",
    "CollectorConfig",
    "CollectorError",
    "InvalidArgument",
    "PermissionDenied",
    "ResourceExhausted",
    "Unauthenticated",
    "serve",
]
