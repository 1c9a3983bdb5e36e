"""fedmml messages inside Flower messages: the payload bytes and JSON header travel unchanged.

The fedmml header and safetensors blob go into one ``ConfigRecord`` as a str and bytes, so the bytes Flower
carries are the project's counted bytes plus Flower's own framing. A second ``ConfigRecord`` repeats the
per-round settings (round, stage, method, learning rates) in Flower's own form, for mods and logs.
"""

from __future__ import annotations

import json
from typing import Any

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedmml.federation.payload import Message

PAYLOAD = "fedmml"
ROUND_CONFIG = "config"
METRICS = "metrics"
CLIENT_SECONDS = "client-s"  # in a reply's MetricRecord: the node's time in Client.handle
NO_RUN_STATE = "this node holds no run state"  # a restarted node's error: the server sets it up again


def round_config(meta: dict[str, Any]) -> ConfigRecord:
    """The per-round settings of a training instruction as a flat ConfigRecord."""
    stage = meta["stage"]
    record: dict[str, Any] = {
        "round": meta["round"],
        "stage": stage["index"] + 1,
        "method": meta["method"],
        "local-epochs": meta["local_epochs"],
    }
    record.update({f"lr-{group}": float(lr) for group, lr in stage["lr"].items()})
    return ConfigRecord(record)


def pack(message: Message, train: bool, client_s: float = 0.0) -> RecordDict:
    """A fedmml message as Flower message content (a reply also says how long the client took)."""
    content = RecordDict({PAYLOAD: ConfigRecord({"meta": message.header.decode(), "blob": message.blob})})
    if train and "stage" in message.meta:
        content[ROUND_CONFIG] = round_config(message.meta)
    elif "num_samples" in message.meta:
        content[METRICS] = MetricRecord(
            {
                "num-examples": message.meta["num_samples"],
                "train-loss": float(message.meta["train_loss"]),
                CLIENT_SECONDS: client_s,
            }
        )
    return content


def unpack(content: RecordDict) -> Message:
    """The fedmml message carried in Flower message content."""
    record = content.config_records[PAYLOAD]
    return Message(json.loads(str(record["meta"])), bytes(record["blob"]))


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's records as Flower counts them (values plus keys, without transport framing)."""
    return sum(_record_bytes(record) for record in content.values())


def _record_bytes(record: Any) -> int:
    if not isinstance(record, ConfigRecord):
        return record.count_bytes()
    # Flower's ConfigRecord.count_bytes raises on an empty str, bytes or list (flwr 1.42), which SecAgg+'s
    # records and a FitRes' status hold; counted here alike: keys plus values, 8 bytes a number, 1 a bool.
    return sum(len(key) + _value_bytes(value) for key, value in record.items())


def _value_bytes(value: Any) -> int:
    if isinstance(value, list):
        return sum(_value_bytes(v) for v in value)
    if isinstance(value, bool):
        return 1
    if isinstance(value, str):
        return len(value.encode())
    return len(value) if isinstance(value, bytes) else 8
