"""Build and load the model halves from a checkpoint directory: the entry point servers use."""

from __future__ import annotations

from pathlib import Path

import torch

from deepsplit.model.config import ModelConfig
from deepsplit.model.loader import load_weights
from deepsplit.model.qwen3_moe import Qwen3MoeForCausalLM
from deepsplit.model.vision import VisionModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str | None, cfg: ModelConfig) -> torch.dtype:
    name = name or cfg.dtype
    if name not in DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


def load_language_model(
    path: str | Path, dtype: str | None = None, cfg: ModelConfig | None = None
) -> tuple[Qwen3MoeForCausalLM, ModelConfig]:
    cfg = cfg or ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg.text, cfg.n_deepstack)
    model = _materialize(model, resolve_dtype(dtype, cfg))
    load_weights(model, path, "text")
    return model.eval().requires_grad_(False), cfg


def load_vision_model(
    path: str | Path, dtype: str | None = None, cfg: ModelConfig | None = None
) -> tuple[VisionModel, ModelConfig]:
    cfg = cfg or ModelConfig.from_dir(path)
    with torch.device("meta"):
        model = VisionModel(cfg.vision)
    model = _materialize(model, resolve_dtype(dtype, cfg))
    load_weights(model, path, "vision")
    return model.eval().requires_grad_(False), cfg


def _materialize(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Meta-built module -> uninitialised CPU parameters of `dtype` (the loader fills every one)."""
    model = model.to_empty(device="cpu").to(dtype)
    for m in model.modules():
        if hasattr(m, "init_buffers"):
            m.init_buffers()
    return model
