"""wandb internals: a settings knob and the protobuf of its run files (no public reader exists)."""

from __future__ import annotations

from typing import Any, Dict

#: wandb-core buffers the offline .wandb file and writes it every 15 s by default: a job killed hard
#: (SIGKILL at the time limit, OOM) would lose that much, config included. Flush more often.
FLUSH_INTERVAL_S = 2.0


def flush_settings(wandb) -> Dict[str, Any]:
    """Settings that make wandb-core flush its transaction log often, while the private knob exists."""
    knob = "x_transaction_log_flush_interval"
    return {knob: FLUSH_INTERVAL_S} if knob in wandb.Settings.model_fields else {}


def record_protobuf():
    """The protobuf module of the records in a .wandb file."""
    from wandb.proto import wandb_internal_pb2

    return wandb_internal_pb2
