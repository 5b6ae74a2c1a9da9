"""What a sender pushes for one request, the aux record that seals it, and their checksums.

`MultimodalPayload.prepare(desc)` checks the payload against the receiver's descriptor (hidden,
deepstack, dtype) and lays each buffer out row-major and contiguous, as the blocks store it. The aux
record (written last, into the request's first block) repeats the lengths, the mrope delta, a tag of
the room id and a crc32, so the receiver never hands a torn, stale or foreign write to the model.
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

    def prepare(self, hidden: int, num_deepstack: int, dtype: str) -> dict[str, torch.Tensor]:
        """name -> contiguous tensor whose row i is request row i of that buffer."""
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
            "fill_ids": self.fill_ids.to(torch.int32).contiguous(),
            "mrope": self.mrope.to(torch.int32).t().contiguous(),
            "embeddings": self.embeddings.to(dt).contiguous(),
            "deepstack": self.deepstack.to(dt).contiguous(),
        }


def _bytes(t: torch.Tensor) -> np.ndarray:
    if t.dtype in (torch.int32, torch.float32) and t.is_contiguous():
        return t.numpy()  # no byte view needed: crc32 reads the buffer
    return t.contiguous().view(-1).view(torch.uint8).numpy()


def checksum(rows: dict[str, torch.Tensor], full: bool) -> int:
    """crc32 of fill ids and positions (and, if `full`, of vision and deepstack rows), as int32."""
    c = zlib.crc32(_bytes(rows["fill_ids"]))
    c = zlib.crc32(_bytes(rows["mrope"]), c)
    if full:
        c = zlib.crc32(_bytes(rows["embeddings"]), c)
        c = zlib.crc32(_bytes(rows["deepstack"]), c)
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

    def pack(self) -> torch.Tensor:
        """[AUX_WORDS] int32, the layout of one aux slot."""
        words = [MAGIC, AUX_VERSION, self.room_tag, self.total_rows, self.vision_rows, self.mrope_delta]
        words += [self.num_images, self.checksum]
        return torch.tensor(words + [0] * (AUX_WORDS - len(words)), dtype=torch.int32)

    @classmethod
    def unpack(cls, slot) -> AuxRecord | None:
        """The record in an aux slot (int32 tensor or array), or None if it holds no sealed record."""
        w = slot.tolist()
        if w[0] != MAGIC or w[1] != AUX_VERSION:
            return None
        return cls(*w[2:8])
