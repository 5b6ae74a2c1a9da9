"""Weights prepacked for oneDNN's inner product: the GEMM backend of the serving path on x86 CPUs.

torch's default fp32 CPU GEMM is MKL, which takes a slow code path on AMD CPUs; oneDNN with a
weight reordered once into its blocked layout does not. Measured on a 2-core AMD EPYC (AVX-512):
lm_head 151936x512 at B=32 39 -> 16 ms, MoE experts at 128 rows each 20 -> 11 ms per layer,
a 512x512 projection at 1024 rows 2.3 -> 1.0 ms. A packed weight is an opaque oneDNN tensor, usable
only through `linear`; the dense parameter stays (loading, the oracles, the unpacked path), so a
packed weight costs its size again in memory. Where oneDNN is unavailable `pack` returns None and
the model keeps its dense path. The model decides what to pack (`Qwen3MoeForCausalLM.pack_weights`).
"""

from __future__ import annotations

import torch


def available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def pack(weight: torch.Tensor, batch_hint: int = 32) -> torch.Tensor | None:
    """weight [N, K] (as nn.Linear's) -> its oneDNN layout, tuned for ~`batch_hint` rows; None if
    oneDNN is unavailable."""
    if not available() or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N], W packed by `pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
