"""Sparse MoE block: softmax router -> top-k -> renormalise -> grouped expert GEMMs.

Expert weights keep the checkpoint's on-disk orientation (`gate_up_proj [E, H, 2I]`,
`down_proj [E, I, H]`) so `x @ W[e]` needs no transpose. Tokens are sorted by expert once and each
expert that received tokens runs one GEMM over all of them: no Python loop over tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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
    def __init__(self, hidden: int, inter: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.gate = Router(hidden, num_experts)
        self.experts = Experts(num_experts, hidden, inter)
        self.top_k, self.num_experts = top_k, num_experts

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k] in x.dtype, expert ids [T, k])."""
        probs = F.softmax(F.linear(x, self.gate.weight), dim=-1, dtype=torch.float)
        top_w, top_i = torch.topk(probs, self.top_k, dim=-1)
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
        return top_w.to(x.dtype), top_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        T, H = x.shape
        weights, experts = self.route(x)
        flat = experts.reshape(-1)  # [T*k]
        order = torch.argsort(flat, stable=True)
        token_of = order // self.top_k  # source token of each sorted assignment
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        xs = x[token_of]  # [T*k, H], grouped by expert
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            end = start + n
            h = xs[start:end] @ self.experts.gate_up_proj[e]  # [n, 2I]
            g, u = h.chunk(2, dim=-1)
            act = F.silu(g, inplace=True).mul_(u)  # [n, I], in place on the temporary h
            torch.mm(act, self.experts.down_proj[e], out=ys[start:end])
            start = end
        ys.mul_(weights.reshape(-1)[order, None])
        return torch.zeros_like(x).index_add_(0, token_of, ys)
