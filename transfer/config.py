"""Settings of the data plane: the receive pool's shape and the transfer endpoints.

`BufferSpec` fixes the five buffers' geometry (it must match the model: hidden size, deepstack
layers, dtype); `ReceiverSettings` and `SenderSettings` say where control and data flow. Frozen and
validated; the servers build them from their own YAML settings. Nothing here allocates.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

Backend = Literal["mooncake", "zmq"]
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported buffer dtype {name!r}; use one of {sorted(_DTYPES)}") from None


class BufferSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    hidden: int = Field(ge=1, description="text hidden size: one vision row is `hidden` values")
    num_deepstack: int = Field(ge=0, description="deepstack layers: a deepstack row is hidden * this")
    dtype: str = "float32"
    block_size: int = Field(256, ge=1, description="rows per block")
    num_blocks: int = Field(64, ge=1, description="blocks in the pool")

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def num_rows(self) -> int:
        return self.block_size * self.num_blocks

    @property
    def row_bytes(self) -> int:
        """Bytes one token row occupies across the five buffers (aux is per block)."""
        es = torch.empty((), dtype=self.torch_dtype).element_size()
        return self.hidden * es * (1 + self.num_deepstack) + 4 + 12

    @classmethod
    def for_budget(cls, hidden: int, num_deepstack: int, dtype: str, block_size: int, pool_bytes: int):
        """As many blocks as `pool_bytes` holds (at least one)."""
        probe = cls(
            hidden=hidden, num_deepstack=num_deepstack, dtype=dtype, block_size=block_size, num_blocks=1
        )
        n = max(1, pool_bytes // (probe.row_bytes * block_size))
        return probe.model_copy(update={"num_blocks": n})


class ReceiverSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Backend = "zmq"
    host: str = Field("127.0.0.1", description="address senders reach this node at (control + data)")
    control_port: int = Field(0, ge=0, le=65535, description="ZMQ control/data port (0: pick a free one)")
    mooncake_protocol: str = Field("tcp", description="tcp | rdma")
    mooncake_device: str = Field("", description="RDMA device names, e.g. mlx5_0 (empty for tcp)")
    room_ttl_s: float = Field(60.0, gt=0, description="a room not done within this is failed and freed")
    stale_write_guard_s: float = Field(
        600.0,
        gt=0,
        description="Mooncake: blocks of a failed room stay unused until its sender reports back (its "
        "write returned) or this long, so a write delayed by a partition never lands in another room",
    )
    grow_on_begin: bool = Field(
        True, description="grow a room at the handshake when the sender announces more rows (saves a resume)"
    )
    checksum: Literal["meta", "full"] = Field(
        "meta", description="meta: ids+positions crc32 and lengths; full: also every vision/deepstack byte"
    )
    keep_freed_heap_bytes: int = Field(
        128 * 2**20,
        ge=0,
        description="glibc: keep up to this much freed heap per malloc arena, so the buffers libzmq "
        "mallocs for each received message are reused, not faulted in again every room (0: leave "
        "malloc alone; see transfer/heap.py)",
    )


class SenderSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = Field("127.0.0.1", description="address this node's Mooncake engine binds/advertises")
    mooncake_protocol: str = "tcp"
    mooncake_device: str = ""
    mooncake_write_pieces: int = Field(
        4, ge=1, description="cut a write batch into about this many parallel pieces (Mooncake workers)"
    )
    mooncake_min_piece_bytes: int = Field(256 * 1024, ge=4096, description="never cut pieces smaller")
    mooncake_write_retries: int = Field(
        1,
        ge=0,
        description="send failed pieces again this often (Mooncake fails the writes that meet a "
        "connection the receiver has just reset; the next attempt opens a new one)",
    )
    max_idle_sockets: int = Field(8, ge=0, description="pooled control connections kept per receiver")
    link_timeout_s: float = Field(
        10.0,
        ge=0,
        description="a receiver whose host stops answering (it died, the network partitioned) is given "
        "up after about this long: TCP keepalive probes on an idle control connection, "
        "TCP_USER_TIMEOUT on one with bytes unacknowledged; the rooms waiting on it fail then, not at "
        "their deadline. 0: the kernel's defaults (minutes to hours)",
    )


def dead_peer_tcp(timeout_s: float) -> tuple[int, int, int, int]:
    """TCP keepalive idle and interval seconds, probe count and TCP_USER_TIMEOUT milliseconds with
    which a connection to a peer that stopped answering (its host died, the network partitioned:
    nothing resets it) ends after about `timeout_s`: probes when idle, the user timeout while bytes
    are unacknowledged. A slow peer is not a silent one: its bytes keep being acknowledged."""
    return max(1, int(timeout_s / 2)), max(1, int(timeout_s / 6)), 3, int(timeout_s * 1000)
