"""The Qwen3 MoE language model: ONE class for text-only, monolithic VL and disaggregated language use.

`Qwen3MoeModel.forward(..., input_deepstack_embeds=None)`: `None` is plain text; otherwise a
`[T, n_deepstack * H]` tensor aligned with the step's tokens (zero on text rows) whose slice
`[:, i*H:(i+1)*H]` is added after decoder layer `i` (the hook `_process_layer_output`). The layer
loop exists once. Attribute names equal the HF checkpoint keys below `model.language_model.`.
"""

from __future__ import annotations

import torch
from torch import nn

from deepsplit.model import packed
from deepsplit.model.attention import AttentionMetadata, PagedKVCache, attention
from deepsplit.model.config import TextConfig
from deepsplit.model.layers import (
    DenseMLP,
    MRotaryEmbedding,
    RMSNorm,
    logits_and_argmax,
    norm_rope,
    row_max,
)
from deepsplit.model.moe import SparseMoeBlock


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.d, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.d, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.d, bias=bias)
        self.o_proj = nn.Linear(self.nh * self.d, cfg.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps)
        self.scale = self.d**-0.5
        self._qkv: torch.Tensor | None = None  # q, k, v projections packed as one weight
        self._o: torch.Tensor | None = None

    def pack(self) -> None:
        if self.q_proj.bias is None:
            w = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
            self._qkv, self._o = packed.pack(w), packed.pack(self.o_proj.weight)

    def forward(self, x, cos, sin, meta: AttentionMetadata, cache) -> torch.Tensor:
        T, nq, nkv = x.shape[0], self.nh * self.d, self.nkv * self.d
        if self._qkv is not None:
            q, k, v = packed.linear(x, self._qkv).split([nq, nkv, nkv], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = norm_rope(q.view(T, self.nh, self.d), self.q_norm, cos, sin)
        k = norm_rope(k.view(T, self.nkv, self.d), self.k_norm, cos, sin)
        o = attention(q, k, v.view(T, self.nkv, self.d), meta, cache, self.scale)
        return self.o_proj(o) if self._o is None else packed.linear(o, self._o)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        if cfg.is_moe_layer(idx):
            self.mlp = SparseMoeBlock(
                cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok
            )
        else:
            self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, cos, sin, meta, cache) -> torch.Tensor:
        a = self.self_attn(self.input_layernorm(h), cos, sin, meta, cache)
        h, x = self.post_attention_layernorm.add(h, a)  # h + a and its norm, one pass
        return h + self.mlp(x)


class Qwen3MoeModel(nn.Module):
    def __init__(self, cfg: TextConfig, n_deepstack: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.n_deepstack = n_deepstack
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = MRotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.mrope_section)

    def embed(
        self,
        input_ids: torch.Tensor,
        vision_embeds: torch.Tensor | None = None,
        vision_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings `[T, H]` with the vision rows (`vision_mask` True, in order) replaced."""
        h = self.embed_tokens(input_ids)
        if vision_embeds is not None:
            h[vision_mask] = vision_embeds.to(h.dtype)
        return h

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        kv_cache: PagedKVCache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        input_deepstack_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids: [T]; positions: [3, T] (or [T] for text); returns final-normed hidden [T, H]."""
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        cos, sin = self.rotary(positions, h.dtype)
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, meta, None if kv_cache is None else kv_cache.layer(i))
            h = self._process_layer_output(i, h, input_deepstack_embeds)
        return self.norm(h)

    def _process_layer_output(
        self, idx: int, h: torch.Tensor, deepstack: torch.Tensor | None
    ) -> torch.Tensor:
        """The one per-layer hook: add deepstack slice `idx` after the first `n_deepstack` layers."""
        if deepstack is None or idx >= deepstack.shape[-1] // h.shape[-1]:
            return h
        H = h.shape[-1]
        return h + deepstack[:, idx * H : (idx + 1) * H].to(h.dtype)


class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, cfg: TextConfig, n_deepstack: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.model = Qwen3MoeModel(cfg, n_deepstack)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._lm_head: list[torch.Tensor] | None = None  # packed, LM_HEAD_CHUNK vocabulary rows each

    def forward(
        self, input_ids, positions, meta, kv_cache=None, inputs_embeds=None, input_deepstack_embeds=None
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta, kv_cache, inputs_embeds, input_deepstack_embeds)

    def pack_weights(self) -> Qwen3MoeForCausalLM:
        """Prepack the large GEMM weights for oneDNN (`deepsplit.model.packed`): attention
        projections, experts, dense MLPs, lm_head. The serving runner calls this; a no-op where
        oneDNN is unavailable. Costs the packed weights' size again in memory."""
        for m in self.modules():
            if m is not self and hasattr(m, "pack"):
                m.pack()
        W = self.lm_head.weight
        chunks = [packed.pack(W[a : a + LM_HEAD_CHUNK]) for a in range(0, W.shape[0], LM_HEAD_CHUNK)]
        self._lm_head = None if any(c is None for c in chunks) else chunks
        return self

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, H] (rows to sample from) -> logits [B, V] in float32.

        Computed as `W @ h^T`: with W [V, H] row-major that is 1.5x (B=32) to 4x (B=4) faster on CPU
        than `h @ W^T` (F.linear); the result is a transposed view."""
        return torch.mm(self.lm_head.weight, hidden.t()).t().float()

    def sample_logits(
        self, hidden: torch.Tensor, rows: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """hidden [B, H] -> (argmax [B] of the logits, float32 logits [len(rows), V] of `rows` only,
        None without rows): `compute_logits` with the argmax taken chunk by chunk of the vocabulary
        while the chunk is in cache, and no [B, V] tensor unless rows need it."""
        if self._lm_head is None:
            logits, best = logits_and_argmax(self.lm_head.weight, hidden)
            return best, (logits[rows] if rows else None)
        sel = torch.tensor(rows) if 0 < len(rows) < hidden.shape[0] else None
        vals, idx, parts, a = [], [], [], 0
        for w in self._lm_head:
            y = packed.linear(hidden, w)  # [B, C]
            m, i = row_max(y)
            vals.append(m)
            idx.append(i + a)
            a += y.shape[1]
            if rows:
                parts.append(y if sel is None else y[sel])
        j = torch.stack(vals).argmax(0, keepdim=True)  # [1, B]: the chunk holding each row's best
        return torch.stack(idx).gather(0, j)[0], (torch.cat(parts, dim=1).float() if rows else None)


# vocabulary rows per packed lm_head piece: its [B, C] logits stay in cache for the argmax
LM_HEAD_CHUNK = 16384
