"""Size presets for offline Qwen3-VL-MoE checkpoints.

`tiny` is for tests (loads and generates in well under a second); `small` is for benchmarks (big
enough that compute, not Python, dominates). Both use the real Qwen vocabulary and special tokens.
"""

from __future__ import annotations

from typing import Any

VOCAB_SIZE = 151936  # real Qwen3 vocabulary (tokenizer ids < 151669, rest padding rows)
# Expert matrices are never square (2*moe_intermediate != hidden): transformers decides whether to
# transpose them on load by comparing shapes, so a square one would load the wrong way round.

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "text": dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            moe_intermediate_size=48,
            num_experts=8,
            num_experts_per_tok=2,
            mrope_section=[6, 5, 5],
            max_position_embeddings=4096,
        ),
        "vision": dict(
            hidden_size=32,
            intermediate_size=64,
            depth=4,
            num_heads=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[1, 2, 3],
        ),
        "max_pixels": 256 * 256,
    },
    "small": {
        "text": dict(
            hidden_size=512,
            intermediate_size=1536,
            num_hidden_layers=8,
            num_attention_heads=8,
            num_key_value_heads=4,
            head_dim=64,
            moe_intermediate_size=320,
            num_experts=32,
            num_experts_per_tok=4,
            mrope_section=[12, 10, 10],
            max_position_embeddings=32768,
        ),
        "vision": dict(
            hidden_size=256,
            intermediate_size=1024,
            depth=8,
            num_heads=4,
            out_hidden_size=512,
            num_position_embeddings=2304,
            deepstack_visual_indexes=[1, 3, 5],
        ),
        "max_pixels": 1024 * 1024,
    },
}
