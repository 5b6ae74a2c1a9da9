"""Shared fixtures: the tiny checkpoint (built once per session, offline) and small helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch_threads = int(os.environ.get("DEEPSPLIT_TEST_THREADS", "2"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A deterministic tiny Qwen3-VL-MoE checkpoint (seed 0), written by our own builder."""
    from deepsplit.checkpoint.builder import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("tiny-model"), preset="tiny", seed=0)


@pytest.fixture(scope="session")
def hf_oracle(tiny_model_dir):
    """transformers' Qwen3VLMoeForConditionalGeneration on the tiny checkpoint, fp32, eval mode."""
    import torch
    from transformers import Qwen3VLMoeForConditionalGeneration

    return Qwen3VLMoeForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
