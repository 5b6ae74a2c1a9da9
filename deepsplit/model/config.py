"""Typed, frozen views of a Qwen3-VL-MoE `config.json` (text and vision halves).

Parsing fails with a clear message when the directory is not a Qwen3-VL-MoE checkpoint. Derived
sizes are properties. Nothing here touches weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

SUPPORTED_MODEL_TYPES = ("qwen3_vl_moe",)


class CheckpointError(ValueError):
    """The directory is not a usable Qwen3-VL-MoE checkpoint."""


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    moe_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    mrope_interleaved: bool
    max_position_embeddings: int
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    def is_moe_layer(self, idx: int) -> bool:
        return (
            idx not in self.mlp_only_layers
            and self.num_experts > 0
            and (idx + 1) % self.decoder_sparse_step == 0
        )


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int
    intermediate_size: int
    depth: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    num_position_embeddings: int
    deepstack_visual_indexes: tuple[int, ...]
    hidden_act: str
    rope_theta: float

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:  # flattened pixels per patch
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


@dataclass(frozen=True)
class ModelConfig:
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    vision_end_token_id: int
    dtype: str = "float32"
    eos_token_ids: tuple[int, ...] = field(default=())

    @property
    def n_deepstack(self) -> int:
        return len(self.vision.deepstack_visual_indexes)

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{path} is not a checkpoint directory: no config.json")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {e}") from e
        if raw.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{path} holds model_type={raw.get('model_type')!r}; deepsplit serves {SUPPORTED_MODEL_TYPES}"
            )
        eos = _eos_ids(path, raw)
        try:
            return cls(
                text=_text(raw["text_config"]),
                vision=_vision(raw["vision_config"]),
                image_token_id=raw.get("image_token_id", 151655),
                video_token_id=raw.get("video_token_id", 151656),
                vision_start_token_id=raw.get("vision_start_token_id", 151652),
                vision_end_token_id=raw.get("vision_end_token_id", 151653),
                dtype=str(
                    raw.get("dtype") or raw.get("torch_dtype") or raw["text_config"].get("dtype") or "float32"
                ),
                eos_token_ids=eos,
            )
        except KeyError as e:
            raise CheckpointError(f"{cfg_file} lacks the field {e.args[0]!r}") from e


def _rope(raw: dict) -> dict:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    theta = rope.get("rope_theta", raw.get("rope_theta"))
    return {**rope, "rope_theta": theta}


def _text(t: dict) -> TextConfig:
    rope = _rope(t)
    heads = t["num_attention_heads"]
    return TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        num_hidden_layers=t["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=t.get("num_key_value_heads") or heads,
        head_dim=t.get("head_dim") or t["hidden_size"] // heads,
        intermediate_size=t["intermediate_size"],
        moe_intermediate_size=t["moe_intermediate_size"],
        num_experts=t.get("num_experts", t.get("num_local_experts", 0)),
        num_experts_per_tok=t["num_experts_per_tok"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope["rope_theta"] or 5_000_000.0),
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
        max_position_embeddings=t.get("max_position_embeddings", 32768),
        decoder_sparse_step=t.get("decoder_sparse_step", 1),
        mlp_only_layers=tuple(t.get("mlp_only_layers") or ()),
        attention_bias=bool(t.get("attention_bias", False)),
        tie_word_embeddings=bool(t.get("tie_word_embeddings", False)),
    )


def _vision(v: dict) -> VisionConfig:
    rope = _rope(v)
    return VisionConfig(
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        depth=v["depth"],
        num_heads=v["num_heads"],
        out_hidden_size=v["out_hidden_size"],
        patch_size=v.get("patch_size", 16),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        in_channels=v.get("in_channels", 3),
        num_position_embeddings=v["num_position_embeddings"],
        deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes") or ()),
        hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
        rope_theta=float(rope.get("rope_theta") or 10000.0),
    )


def _eos_ids(path: Path, raw: dict) -> tuple[int, ...]:
    ids: list[int] = []
    gen = path / "generation_config.json"
    sources = [json.loads(gen.read_text())] if gen.is_file() else []
    sources.append(raw.get("text_config", {}))
    for src in sources:
        eos = src.get("eos_token_id")
        for e in eos if isinstance(eos, list) else [eos]:
            if isinstance(e, int) and e not in ids:
                ids.append(e)
    return tuple(ids)
