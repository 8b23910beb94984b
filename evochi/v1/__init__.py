"""Evochi protocol v1: the worker client, channel helpers and state codecs.

The generated protocol code lives beside this file (`evochi_pb2`, `evochi_pb2_grpc`);
it is produced by `make proto` from `proto/evochi/v1/evochi.proto` and never edited.
"""

from evochi.v1.channel import (
    DEFAULT_MAX_MESSAGE_BYTES,
    channel_options,
    insecure_channel,
    secure_channel,
)
from evochi.v1.codec import PickleZstdCodec, StateCodec, restricted_loads
from evochi.v1.errors import (
    EvochiError,
    ProtocolError,
    ServerGoneError,
    ServerUnavailableError,
    StateDecodeError,
    StreamBrokenError,
    SubscriptionRejectedError,
)
from evochi.v1.worker import Eval, ReconnectPolicy, Worker

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "Eval",
    "EvochiError",
    "PickleZstdCodec",
    "ProtocolError",
    "ReconnectPolicy",
    "ServerGoneError",
    "ServerUnavailableError",
    "StateCodec",
    "StateDecodeError",
    "StreamBrokenError",
    "SubscriptionRejectedError",
    "Worker",
    "channel_options",
    "insecure_channel",
    "restricted_loads",
    "secure_channel",
]
