"""Model code for Qwen3-VL-MoE written for a serving engine (flattened tokens, paged KV cache)."""
