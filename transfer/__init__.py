"""transfer/: the data plane between encode servers and language servers.

The language node's `TransferReceiver` owns the `MultimodalDataBuffers` and opens a room per
request (its `RoomDescriptor` is what the encoder needs); the encoder's `TransferSender` pushes a
`MultimodalPayload` into that room over Mooncake or ZMQ, resuming when the room needs more blocks.
"""

from transfer.allocator import BlockAllocator, PoolExhausted
from transfer.buffers import MultimodalDataBuffers
from transfer.config import BufferSpec, ReceiverSettings, SenderSettings
from transfer.messages import BadMessage, RoomDescriptor, descriptor_from_builtins, descriptor_to_builtins
from transfer.payload import MultimodalPayload
from transfer.receiver import ReceivedRoom, RoomFailed, TransferReceiver
from transfer.sender import SendResult, TransferFailed, TransferSender

__all__ = [
    "BadMessage",
    "BlockAllocator",
    "BufferSpec",
    "MultimodalDataBuffers",
    "MultimodalPayload",
    "PoolExhausted",
    "ReceivedRoom",
    "ReceiverSettings",
    "RoomDescriptor",
    "RoomFailed",
    "SendResult",
    "SenderSettings",
    "TransferFailed",
    "TransferReceiver",
    "TransferSender",
    "descriptor_from_builtins",
    "descriptor_to_builtins",
]
