"""What a sender pushes for one request, the aux record that seals it, and their checksums.

`MultimodalPayload.prepare(hidden, n_deepstack, dtype)` checks the payload against the receiver's
descriptor and gives each buffer's rows as flat bytes, row-major and contiguous as the blocks store
them (no copy where the tensors already are). The aux record (written last, into the request's first
block) repeats the lengths, the mrope delta, a tag of the room id and a crc32, so the receiver never
hands a torn, stale or foreign write to the model.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch

from transfer.buffers import AUX_WORDS
from transfer.config import torch_dtype

MAGIC = 0x44535046  # "DSPF"
AUX_VERSION = 1
_PAD = (0,) * (AUX_WORDS - 8)


@dataclass
class MultimodalPayload:
    fill_ids: torch.Tensor  # [N] int: expanded prompt ids
    mrope: torch.Tensor  # [3, N] int: M-RoPE positions
    embeddings: torch.Tensor  # [V, H] vision rows, V <= N
    deepstack: torch.Tensor  # [V, n_ds * H]
    mrope_delta: int
    num_images: int = 0

    @property
    def total_rows(self) -> int:
        return int(self.fill_ids.numel())

    @property
    def vision_rows(self) -> int:
        return int(self.embeddings.shape[0])

    def prepare(self, hidden: int, num_deepstack: int, dtype: str) -> dict[str, np.ndarray]:
        """name -> flat uint8 array whose bytes [r*rb, (r+1)*rb) are request row r of that buffer."""
        n, v = self.total_rows, self.vision_rows
        dt = torch_dtype(dtype)
        if self.mrope.shape != (3, n):
            raise ValueError(f"mrope is {tuple(self.mrope.shape)}, expected (3, {n})")
        if v > n:
            raise ValueError(f"{v} vision rows for a prompt of {n} tokens")
        if self.embeddings.dim() != 2 or self.embeddings.shape[1] != hidden:
            raise ValueError(
                f"embeddings are {tuple(self.embeddings.shape)}, the receiver expects [*, {hidden}]"
            )
        if self.deepstack.shape != (v, num_deepstack * hidden):
            raise ValueError(
                f"deepstack is {tuple(self.deepstack.shape)}, the receiver expects ({v}, {num_deepstack * hidden})"
            )
        return {
            "fill_ids": _flat(self.fill_ids, torch.int32),
            "mrope": _flat(self.mrope, torch.int32, transpose=True),  # [N, 3]: a row's positions together
            "embeddings": _flat(self.embeddings, dt),
            "deepstack": _flat(self.deepstack, dt),
        }


def _flat(t: torch.Tensor, dtype: torch.dtype, transpose: bool = False) -> np.ndarray:
    """t's values (transposed if asked) in `dtype`, row-major, as flat bytes (a view when t already
    is that)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if dtype in (torch.float32, torch.int32):  # numpy knows these: skip torch's view ops
        # (a torch op costs ~40 us more than numpy's .T when its code went cold since the last room)
        a = t.numpy().T if transpose else t.numpy()
        return (a if a.flags.c_contiguous else np.ascontiguousarray(a)).reshape(-1).view(np.uint8)
    return (t.t() if transpose else t).contiguous().view(-1).view(torch.uint8).numpy()


def checksum(rows: dict[str, np.ndarray], full: bool) -> int:
    """crc32 of fill ids and positions (and, if `full`, of vision and deepstack rows), as int32."""
    c = zlib.crc32(rows["fill_ids"])
    c = zlib.crc32(rows["mrope"], c)
    if full:
        c = zlib.crc32(rows["embeddings"], c)
        c = zlib.crc32(rows["deepstack"], c)
    return signed32(c)


def room_tag(room: str) -> int:
    return signed32(zlib.crc32(room.encode()))


def signed32(x: int) -> int:
    """An unsigned 32-bit value (a crc32) as the int32 the aux record stores."""
    return x - (1 << 32) if x >= 1 << 31 else x


@dataclass(frozen=True)
class AuxRecord:
    room_tag: int
    total_rows: int
    vision_rows: int
    mrope_delta: int
    num_images: int
    checksum: int

    def pack(self) -> np.ndarray:
        """[AUX_WORDS] int32, the layout of one aux slot."""
        words = (MAGIC, AUX_VERSION, self.room_tag, self.total_rows, self.vision_rows, self.mrope_delta)
        return np.array(words + (self.num_images, self.checksum) + _PAD, dtype=np.int32)

    @classmethod
    def unpack(cls, slot) -> AuxRecord | None:
        """The record in an aux slot (int32 tensor or array), or None if it holds no sealed record."""
        w = slot.tolist()
        if w[0] != MAGIC or w[1] != AUX_VERSION:
            return None
        return cls(*w[2:8])
