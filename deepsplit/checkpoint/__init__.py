"""Offline, deterministic Qwen3-VL-MoE checkpoints in Hugging Face layout."""
