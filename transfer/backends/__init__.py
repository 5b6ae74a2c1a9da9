"""Transfer backends behind one interface, imported lazily so an optional one stays optional.

`sender_backend(name, settings)` / `receiver_backend(name, settings)` return the `zmq` or `mooncake`
implementation; a backend whose library is missing fails here with a message saying what to
install. The interface itself is in `base.py`.
"""

from __future__ import annotations

from transfer.backends.base import ReceiverBackend, SenderBackend, TransferError, Write, WriteInFlight

__all__ = [
    "ReceiverBackend",
    "SenderBackend",
    "TransferError",
    "Write",
    "WriteInFlight",
    "receiver_backend",
    "sender_backend",
]


def _mooncake():
    try:
        from transfer.backends import mooncake_backend as mooncake
    except ImportError as e:
        raise TransferError(
            f"the mooncake backend needs mooncake-transfer-engine ({e}); "
            "install mooncake-transfer-engine-non-cuda (CPU) or use backend zmq"
        ) from None
    return mooncake


def sender_backend(name: str, settings) -> SenderBackend:
    if name == "zmq":
        from transfer.backends.zmq_backend import ZmqSender

        return ZmqSender()
    if name == "mooncake":
        return _mooncake().MooncakeSender(settings)
    raise TransferError(f"unknown transfer backend {name!r} (mooncake | zmq)")


def receiver_backend(name: str, settings) -> ReceiverBackend:
    if name == "zmq":
        from transfer.backends.zmq_backend import ZmqReceiver

        return ZmqReceiver()
    if name == "mooncake":
        return _mooncake().MooncakeReceiver(settings)
    raise TransferError(f"unknown transfer backend {name!r} (mooncake | zmq)")
