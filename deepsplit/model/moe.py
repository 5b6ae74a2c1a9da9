"""Sparse MoE block: softmax router -> top-k -> renormalise -> expert GEMMs.

The router (logits, softmax, top-k, renormalise) is one native call where the kernels load. Expert
weights keep the checkpoint's on-disk orientation (`gate_up_proj [E, H, 2I]`,
`down_proj [E, I, H]`) so `x @ W[e]` needs no transpose. Dispatches, same result:
- native kernel (`deepsplit.native`, where it loads; fp32, at most NATIVE_MAX_ROWS_PER_EXPERT rows
  per expert on average, i.e. decode): one call for the whole block, each expert's weights streamed
  once, gate/up -> SiLU -> down fused, experts split across threads;
- weights packed for oneDNN (`pack`, the serving path): tokens sorted by expert, one packed GEMM
  pair per expert that received tokens, exactly its rows;
- dense, few rows per expert (decode): every expert's rows padded to the busiest one, `[E, n, H]`,
  and two `bmm` over all experts — no per-expert Python, weights read once (memory-bound anyway);
- dense, many rows (prefill): tokens sorted by expert, one GEMM per expert that received tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepsplit import native
from deepsplit.model import packed

# padded dispatch while the mean rows per touched expert stay at most this and at least half the
# experts are touched: there the expert GEMMs are bound by reading weights, padded rows cost little
PADDED_MAX_ROWS_PER_EXPERT = 32
# native kernel while T * k <= this * E: measured faster than oneDNN-packed and MKL per-expert GEMMs
# up to 32 rows per expert (2x at decode, B=32) on a 2-core Xeon; MKL wins at 128 (prefill chunks)
NATIVE_MAX_ROWS_PER_EXPERT = 32
# the router's logits inside the native call up to this many tokens (decode: one call instead of a
# small GEMM plus the routing, 195 -> 74 us per layer at T=32 in the engine); a GEMM beyond
NATIVE_ROUTER_MAX_ROWS = 256


class Router(nn.Module):
    def __init__(self, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden))


class Experts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden, 2 * inter))  # [E, H, 2I]
        self.down_proj = nn.Parameter(torch.empty(num_experts, inter, hidden))  # [E, I, H]


class SparseMoeBlock(nn.Module):
    def __init__(
        self, hidden: int, inter: int, num_experts: int, top_k: int, native: bool | None = None
    ) -> None:
        super().__init__()
        self.gate = Router(hidden, num_experts)
        self.experts = Experts(num_experts, hidden, inter)
        self.top_k, self.num_experts = top_k, num_experts
        self.native = native  # the native kernel: None where it loads, False never, True insist
        self._packed: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per expert (gate_up, down)

    def pack(self) -> None:
        gu, down = self.experts.gate_up_proj, self.experts.down_proj
        pairs = [(packed.pack(gu[e].t(), 8), packed.pack(down[e].t(), 8)) for e in range(self.num_experts)]
        self._packed = None if any(a is None for a, _ in pairs) else pairs

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] in x.dtype, expert ids [T, k])."""
        W = self.gate.weight
        fp32 = x.dtype == W.dtype == torch.float32
        use_native = fp32 and self.native is not False and native.load()
        if use_native and x.shape[0] <= NATIVE_ROUTER_MAX_ROWS and x.shape[1] % 16 == 0:
            return torch.ops.deepsplit.moe_route_x(x.contiguous(), W, self.top_k)  # logits in the kernel
        logits = F.linear(x, W)  # [T, E]
        if use_native:
            return torch.ops.deepsplit.moe_route(logits.contiguous(), self.top_k)
        probs = F.softmax(logits, dim=-1, dtype=torch.float)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_w.to(x.dtype), top_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        if self._use_native(x):
            gu, down = self.experts.gate_up_proj, self.experts.down_proj
            return torch.ops.deepsplit.moe_experts(x.contiguous(), experts, weights.contiguous(), gu, down)
        flat = experts.reshape(-1)  # [T*k]
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        touched = sum(1 for n in counts if n)
        if self._packed is not None:
            return self._grouped(x, weights, flat, counts)
        if flat.numel() <= PADDED_MAX_ROWS_PER_EXPERT * touched and 2 * touched >= self.num_experts:
            return self._padded(x, weights, flat, max(counts))
        return self._grouped(x, weights, flat, counts)

    def _use_native(self, x: torch.Tensor) -> bool:
        if self.native is not None:
            return self.native
        E, inter, H = self.experts.down_proj.shape
        return (
            x.dtype == self.experts.down_proj.dtype == torch.float32
            and H % 16 == 0
            and inter % 16 == 0
            and x.shape[0] * self.top_k <= NATIVE_MAX_ROWS_PER_EXPERT * E
            and native.load()
        )

    def _padded(self, x: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor, n: int) -> torch.Tensor:
        T, H = x.shape
        k = self.top_k
        onehot = F.one_hot(flat, self.num_experts)  # [T*k, E]
        slot = onehot.cumsum(0).gather(1, flat[:, None]).squeeze(1) - 1  # [T*k] row within its expert
        xp = x.new_zeros(self.num_experts, n, H)
        xp[flat, slot] = x[:, None].expand(T, k, H).reshape(T * k, H)
        h = torch.bmm(xp, self.experts.gate_up_proj)  # [E, n, 2I]
        g, u = h.chunk(2, dim=-1)
        act = F.silu(g).mul_(u)  # [E, n, I]
        y = torch.bmm(act, self.experts.down_proj)  # [E, n, H]
        ys = y[flat, slot].mul_(weights.reshape(-1, 1))  # [T*k, H]
        return ys.view(T, k, H).sum(1)

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, flat: torch.Tensor, counts) -> torch.Tensor:
        order = torch.argsort(flat, stable=True)
        token_of = order // self.top_k  # source token of each sorted assignment
        xs = x[token_of]  # [T*k, H], grouped by expert
        gate_up, down, pk = self.experts.gate_up_proj, self.experts.down_proj, self._packed
        outs, start = [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            xe = xs[start : start + n]
            h = xe @ gate_up[e] if pk is None else packed.linear(xe, pk[e][0])  # [n, 2I]
            g, u = h.chunk(2, dim=-1)
            act = F.silu(g, inplace=True).mul_(u)  # [n, I], in place on the temporary h
            outs.append(act @ down[e] if pk is None else packed.linear(act, pk[e][1]))  # [n, H]
            start += n
        ys = torch.cat(outs)  # [T*k, H], grouped by expert
        ys.mul_(weights.reshape(-1)[order, None])
        return torch.zeros_like(x).index_add_(0, token_of, ys)
