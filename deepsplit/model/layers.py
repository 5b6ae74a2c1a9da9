"""Model-agnostic layers: RMSNorm, rotary application, interleaved M-RoPE tables, dense MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos, sin: [T, d]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


class MRotaryEmbedding(nn.Module):
    """Interleaved 3-axis rotary (t/h/w) of Qwen3-VL: cos/sin `[T, head_dim]` from positions `[3, T]`."""

    def __init__(self, head_dim: int, theta: float, mrope_section: tuple[int, int, int]) -> None:
        super().__init__()
        self.head_dim, self.theta, self.mrope_section = head_dim, theta, mrope_section
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the non-persistent tables, e.g. after building on the meta device."""
        d = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float, device="cpu") / d))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # axis each frequency reads its position from: t by default, h at 1::3, w at 2::3 (interleaved)
        axis = torch.zeros(d // 2, dtype=torch.long, device="cpu")
        for dim in (1, 2):
            axis[dim : self.mrope_section[dim] * 3 : 3] = dim
        self.register_buffer("axis", axis, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            positions = positions.expand(3, -1)
        pos = positions.float()[self.axis]  # [d/2, T]: each frequency's own axis
        freqs = pos.t() * self.inv_freq  # [T, d/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
