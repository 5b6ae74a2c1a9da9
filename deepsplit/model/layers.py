"""Model-agnostic layers: RMSNorm, rotary application (`norm_rope`: q/k norm and rotary in one pass),
interleaved M-RoPE tables, dense MLP, and the lm_head product with its argmax fused (`row_max`).
Where `deepsplit.native` loads, fp32 norms, rotary and row argmax run as its kernels."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepsplit import native
from deepsplit.model import packed


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._native(x):
            return torch.ops.deepsplit.rms_norm(x, self.weight, self.eps)  # one pass
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)  # one op, same bits as below
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def add(self, h: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, self(h + delta)): residual add and norm in one native pass where it loads."""
        if self._native(h) and self._native(delta):
            return torch.ops.deepsplit.add_rms_norm(h, delta, self.weight, self.eps)
        h = h + delta
        return h, self(h)

    def _native(self, x: torch.Tensor) -> bool:
        """The native kernels take fp32 [R, d] with contiguous rows, d % 16 == 0."""
        return (
            x.dtype == self.weight.dtype == torch.float32
            and x.dim() == 2
            and x.stride(-1) == 1
            and x.shape[-1] % 16 == 0
            and native.load()
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, d]; cos, sin: [T, d]."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


def norm_rope(x: torch.Tensor, norm: RMSNorm, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rotary(norm(x), cos, sin)` for x [T, heads, d] (heads contiguous): one native pass for
    fp32 where it loads."""
    d = x.shape[-1]
    if (
        x.dtype == norm.weight.dtype == cos.dtype == torch.float32
        and x.stride(-1) == 1
        and x.stride(-2) == d
        and d % 32 == 0
        and native.load()
    ):
        return torch.ops.deepsplit.norm_rope(x, norm.weight, norm.eps, cos.contiguous(), sin.contiguous())
    return apply_rotary(norm(x), cos, sin)


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
        self._gate_up: torch.Tensor | None = None  # packed (deepsplit.model.packed), gate then up
        self._down: torch.Tensor | None = None

    def pack(self) -> None:
        self._gate_up = packed.pack(torch.cat([self.gate_proj.weight, self.up_proj.weight]))
        self._down = packed.pack(self.down_proj.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gate_up is None or self._down is None:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        g, u = packed.linear(x, self._gate_up).chunk(2, dim=-1)
        return packed.linear(F.silu(g).mul_(u), self._down)


def logits_and_argmax(
    weight: torch.Tensor, hidden: torch.Tensor, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [V, H], hidden [B, H] -> (logits [B, V] float32, their argmax [B]).

    Computed as `W @ h^T` (with W row-major 1.5x (B=32) to 4x (B=4) faster on CPU than `h @ W^T`),
    the vocabulary in chunks: each chunk's product is reduced to its best row while it is still in
    cache, so greedy rows never read the logits back (a strided argmax over [B, V] costs ~10% of the
    product at B=32). `out` (>= V*B elements of weight's dtype) receives the logits; the returned
    view is valid until `out` is written again."""
    V, B = weight.shape[0], hidden.shape[0]
    buf = (weight.new_empty(V * B) if out is None else out[: V * B]).view(V, B)
    hT = hidden.t().contiguous()  # [H, B]
    step = min(V, max(2048, (1 << 17) // B))
    best_v, best_i = [], []
    for a in range(0, V, step):
        m, i = torch.mm(weight[a : a + step], hT, out=buf[a : a + step]).max(0)  # [B] each
        best_v.append(m)
        best_i.append(i + a)
    j = torch.stack(best_v).argmax(0, keepdim=True)  # [1, B]: the chunk holding each row's best
    return buf.t().float(), torch.stack(best_i).gather(0, j)[0]


def row_max(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y [B, C] -> (max [B], first index of it [B]): `y.max(-1)`, by the native kernel for fp32 rows
    where it loads (torch's max with indices is not vectorized on CPU: 272 -> 26 us at [32, 16384])."""
    if y.dtype == torch.float32 and y.stride(-1) == 1 and native.load():
        return torch.ops.deepsplit.row_max(y)
    return y.max(-1)
