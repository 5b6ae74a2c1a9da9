"""The Qwen3-VL vision tower: patch embedding, interpolated learned positions, 2-D rotary, blocks with
attention confined to each image, the merger and the deepstack mergers.

`VisionModel.forward(pixel_values [P, C*T*p*p], grid_thw [n, 3])` encodes the images of many
requests at once and returns merged embeddings `[R, out_H]` and deepstack features
`[R, n_ds * out_H]` (R = sum of t*h*w/merge^2); `split_by_image` cuts them per image. Attribute
names equal the HF checkpoint keys below `model.visual.`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deepsplit.model.config import VisionConfig
from deepsplit.model.layers import rotate_half


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a stride==kernel conv over exactly one kernel per patch is a linear map on the flat patch
        w = self.proj.weight.reshape(self.proj.weight.shape[0], -1)
        return F.linear(x.to(w.dtype), w, self.proj.bias)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.nh, self.d = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=True)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seqlens: list[int]
    ) -> torch.Tensor:
        N = x.shape[0]
        q, k, v = self.qkv(x).reshape(N, 3, self.nh, self.d).unbind(1)  # each [N, nh, d]
        q, k = _rotary_fp32(q, cos, sin), _rotary_fp32(k, cos, sin)
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # [nh, N, d]
        outs = [
            F.scaled_dot_product_attention(qi, ki, vi)
            for qi, ki, vi in zip(q.split(seqlens, 1), k.split(seqlens, 1), v.split(seqlens, 1), strict=False)
        ]
        return self.proj(torch.cat(outs, dim=1).transpose(0, 1).reshape(N, -1))


def _rotary_fp32(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    return (xf * cos[:, None] + rotate_half(xf) * sin[:, None]).to(x.dtype)


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.approximate = "tanh" if cfg.hidden_act == "gelu_pytorch_tanh" else "none"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate=self.approximate))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg)

    def forward(self, x, cos, sin, seqlens):
        x = x + self.attn(self.norm1(x), cos, sin, seqlens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Groups each merge^2 block of patches into one row of the language model's width."""

    def __init__(self, cfg: VisionConfig, postshuffle_norm: bool) -> None:
        super().__init__()
        self.width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(self.width if postshuffle_norm else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.width, self.width)
        self.linear_fc2 = nn.Linear(self.width, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (
            self.norm(x.reshape(-1, self.width))
            if self.postshuffle_norm
            else self.norm(x).reshape(-1, self.width)
        )
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.side = int(cfg.num_position_embeddings**0.5)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes
        )
        self.init_buffers()

    def init_buffers(self) -> None:
        """(Re)compute the rotary table, e.g. after building on the meta device."""
        half = self.cfg.head_dim // 2  # h and w each rotate half of the head
        inv_freq = 1.0 / (
            self.cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device="cpu") / half)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @property
    def merge_unit(self) -> int:
        return self.cfg.spatial_merge_size**2

    def forward(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (embeds [R, out_H], deepstack [R, n_ds * out_H]) for all images, in order."""
        grid = grid_thw.tolist()
        x = self.patch_embed(pixel_values)
        idx, wts = _interp_taps(grid, self.side, self.cfg.spatial_merge_size)
        x = x + (self.pos_embed(idx) * wts[:, :, None]).sum(1).to(x.dtype)
        rot = (
            _rotary_positions(grid, self.cfg.spatial_merge_size).float()[..., None] * self.inv_freq
        )  # [N, 2, d/4]
        emb = torch.cat((rot[:, 0], rot[:, 1]), dim=-1)
        emb = torch.cat((emb, emb), dim=-1)  # [N, d]
        cos, sin = emb.cos(), emb.sin()
        seqlens = [h * w for t, h, w in grid for _ in range(t)]
        deepstack = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, seqlens)
            if i in self.cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.cfg.deepstack_visual_indexes.index(i)](x))
        embeds = self.merger(x)
        ds = torch.cat(deepstack, dim=-1) if deepstack else embeds.new_zeros(embeds.shape[0], 0)
        return embeds, ds

    def rows_per_image(self, grid_thw: torch.Tensor) -> list[int]:
        return [t * h * w // self.merge_unit for t, h, w in grid_thw.tolist()]


def _rotary_positions(grid: list[list[int]], m: int) -> torch.Tensor:
    """(h, w) of every patch in merge-block order, frames repeated: [N, 2]."""
    out = []
    for t, h, w in grid:
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        shape = (h // m, m, w // m, m)
        hh = hh.reshape(shape).transpose(1, 2).flatten()
        ww = ww.reshape(shape).transpose(1, 2).flatten()
        out.append(torch.stack([hh, ww], dim=-1).repeat(t, 1))
    return torch.cat(out)


def _interp_taps(grid: list[list[int]], side: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (align_corners) taps into the `side x side` learned table for every patch: [N, 4] each."""
    idx, wts = [], []
    for t, h, w in grid:
        hi, hw_ = _axis_taps(h, side)
        wi, ww_ = _axis_taps(w, side)
        taps = (hi[:, None, :, None] * side + wi[None, :, None, :]).reshape(h, w, 4)
        weights = (hw_[:, None, :, None] * ww_[None, :, None, :]).reshape(h, w, 4)
        # reorder rows to merge-block order, like the patches
        taps = taps.reshape(h // m, m, w // m, m, 4).transpose(1, 2).reshape(-1, 4)
        weights = weights.reshape(h // m, m, w // m, m, 4).transpose(1, 2).reshape(-1, 4)
        idx.append(taps.repeat(t, 1))
        wts.append(weights.repeat(t, 1))
    return torch.cat(idx), torch.cat(wts)


def _axis_taps(n: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = torch.arange(n, dtype=torch.float32) * (side - 1) / max(n - 1, 1)
    floor = src.floor()
    taps = (floor.long()[:, None] + torch.arange(2)).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - torch.arange(2)).abs()).clamp(min=0)
    return taps, weights
