"""stepwatch client: attach to a PyTorch MoE training loop and stream per-step statistics.

    from hooks import Monitor
    mon = Monitor(model, optimizer, target="127.0.0.1:7070", run="exp42")

Modules: config (MonitorConfig), adapter (where things are in a model: the protocol and
model/'s adapter), adapters/ (the shipped adapters for Hugging Face Transformers and torchtitan
MoEs, and select_adapter), userlog (monitor.log's scalars), layout (the metric
catalogue and buffer map), stats / gradstats (device-side capture), frames (protobuf encoding),
buffer (bounded step buffer and its full policy), sender/ (background gRPC stream), clips (clip
updates staged to step boundaries), monitor (the call points), null (NullMonitor and the
create_monitor factory). Imports proto only, of ours; model libraries only lazily, in adapters.
integrations/ (HF Trainer and Lightning callbacks) is imported by name, never from here.
"""

from hooks.adapter import AttentionSite, MoEAdapter, MoESite, RouterView, StepFlashAdapter
from hooks.adapters import SUPPORTED_FAMILIES, UnsupportedModelError, select_adapter
from hooks.config import STAT_GROUPS, MonitorConfig
from hooks.monitor import Monitor
from hooks.null import NullMonitor, create_monitor

__all__ = [
    "Monitor",
    "NullMonitor",
    "create_monitor",
    "MonitorConfig",
    "STAT_GROUPS",
    "MoEAdapter",
    "MoESite",
    "AttentionSite",
    "RouterView",
    "StepFlashAdapter",
    "select_adapter",
    "UnsupportedModelError",
    "SUPPORTED_FAMILIES",
]
