"""MultimodalDataBuffers: the receive pool of a language node, five buffers cut into blocks.

Allocated once (and registered once with the backend by the receiver). Block b owns rows
[b*block_size, (b+1)*block_size) of `embeddings` [R, H], `fill_ids` [R] int32, `mrope` [R, 3]
int32 and `deepstack` [R, n_ds*H], plus `aux` [num_blocks, AUX_WORDS] int32 (a request's record
lives in its first block). `runs` maps a request's rows to contiguous byte ranges (what a sender
writes); `read` returns a finished request as tensors, views when its blocks are consecutive.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from transfer.config import BufferSpec

AUX_WORDS = 16
NAMES = ("embeddings", "fill_ids", "mrope", "deepstack", "aux")


@dataclass(frozen=True)
class Run:
    """Rows [src_row, src_row+n) of a request live at pool rows [dst_row, dst_row+n)."""

    src_row: int
    dst_row: int
    n: int


def runs(block_ids: list[int], block_size: int, start: int, stop: int) -> list[Run]:
    """Contiguous pool ranges holding request rows [start, stop), consecutive blocks merged."""
    out: list[Run] = []
    r = start
    while r < stop:
        b, off = divmod(r, block_size)
        n = min(block_size - off, stop - r)
        dst = block_ids[b] * block_size + off
        if out and out[-1].dst_row + out[-1].n == dst and out[-1].src_row + out[-1].n == r:
            last = out[-1]
            out[-1] = Run(last.src_row, last.dst_row, last.n + n)
        else:
            out.append(Run(r, dst, n))
        r += n
    return out


class MultimodalDataBuffers:
    def __init__(self, spec: BufferSpec) -> None:
        self.spec = spec
        R, H, dt = spec.num_rows, spec.hidden, spec.torch_dtype
        self.embeddings = torch.zeros(R, H, dtype=dt)
        self.fill_ids = torch.zeros(R, dtype=torch.int32)
        self.mrope = torch.zeros(R, 3, dtype=torch.int32)
        self.deepstack = torch.zeros(R, spec.num_deepstack * H, dtype=dt)
        self.aux = torch.zeros(spec.num_blocks, AUX_WORDS, dtype=torch.int32)

    def tensor(self, name: str) -> torch.Tensor:
        if name not in NAMES:
            raise KeyError(f"no buffer {name!r}")
        return getattr(self, name)

    def row_bytes(self, name: str) -> int:
        t = self.tensor(name)
        return t[0].numel() * t.element_size()

    def regions(self) -> dict[str, tuple[int, int]]:
        """name -> (address, bytes) of each buffer, for registration with a transfer engine."""
        return {
            n: (self.tensor(n).data_ptr(), self.tensor(n).numel() * self.tensor(n).element_size())
            for n in NAMES
        }

    @property
    def nbytes(self) -> int:
        return sum(b for _, b in self.regions().values())

    def byte_view(self, name: str, offset: int, nbytes: int) -> torch.Tensor:
        """A writable uint8 view of `nbytes` at `offset` of buffer `name` (bounds-checked)."""
        flat = self.tensor(name).view(-1).view(torch.uint8)
        if offset < 0 or nbytes < 0 or offset + nbytes > flat.numel():
            raise ValueError(
                f"{name}[{offset}:{offset + nbytes}] is outside the buffer ({flat.numel()} bytes)"
            )
        return flat[offset : offset + nbytes]

    def read(self, block_ids: list[int], total_rows: int, vision_rows: int) -> dict[str, torch.Tensor]:
        """A finished request's rows: fill_ids [N] int32, mrope [N, 3] int32, embeddings [V, H],
        deepstack [V, n_ds*H]. Views into the pool when the blocks are consecutive, else copies."""
        bs = self.spec.block_size
        parts = runs(block_ids, bs, 0, total_rows)

        def take(t: torch.Tensor, n: int) -> torch.Tensor:
            sel = [(r.dst_row, min(r.n, n - r.src_row)) for r in parts if r.src_row < n]
            if len(sel) == 1:
                return t[sel[0][0] : sel[0][0] + sel[0][1]]
            if not sel:
                return t[:0]
            return torch.cat([t[a : a + k] for a, k in sel])

        return {
            "fill_ids": take(self.fill_ids, total_rows),
            "mrope": take(self.mrope, total_rows),
            "embeddings": take(self.embeddings, vision_rows),
            "deepstack": take(self.deepstack, vision_rows),
        }
