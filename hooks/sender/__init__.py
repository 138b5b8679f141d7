"""The background sender: one gRPC bidirectional stream per rank, fed from the StepBuffer.

    core      the protocol every driver shares: seq, buffer, resend, acks, staleness, Welcome
    threaded  `Sender`, the driver a training process runs (a worker and a reader thread)

The load generator's asyncio driver (thousands of senders on one event loop) builds on the same
core in benchmarks/channel_sender.py; hooks/ never imports it.
"""

from hooks.sender.threaded import Sender

__all__ = ["Sender"]
