"""The offline checkpoint builder: deterministic, loadable by transformers, real tokenizer."""

from __future__ import annotations

import hashlib

import pytest
import torch

from deepsplit.checkpoint.builder import build_config, write_checkpoint


def _digest(path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir())}


def test_same_seed_same_files_other_seed_other_weights(tmp_path, tiny_model_dir):
    a = _digest(write_checkpoint(tmp_path / "a", "tiny", seed=0))
    assert a == _digest(tiny_model_dir)
    b = _digest(write_checkpoint(tmp_path / "b", "tiny", seed=1))
    assert a["model.safetensors"] != b["model.safetensors"]
    assert {k: v for k, v in a.items() if k != "model.safetensors"} == {
        k: v for k, v in b.items() if k != "model.safetensors"
    }


def test_tokenizer_is_the_real_qwen_one(tiny_model_dir):
    from deepsplit.model.processor import Preprocessor

    pre = Preprocessor.from_dir(tiny_model_dir)
    assert pre.image_token_id == 151655
    ids = pre.tokenizer("<|im_start|>user\nhello<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids[0] == 151644 and ids[-1] == 151645 and len(ids) == 5


def test_transformers_loads_tiny_without_missing_keys(tiny_model_dir):
    from transformers import Qwen3VLMoeForConditionalGeneration

    _, info = Qwen3VLMoeForConditionalGeneration.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset"):
        build_config("huge")


@pytest.mark.slow
def test_small_preset_loads_in_transformers_and_ours(tmp_path):
    from transformers import Qwen3VLMoeForConditionalGeneration

    from deepsplit.model.build import load_language_model, load_vision_model

    path = write_checkpoint(tmp_path / "small", "small", seed=0)
    hf, info = Qwen3VLMoeForConditionalGeneration.from_pretrained(
        str(path), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_params = sum(p.numel() for p in hf.parameters())
    del hf
    lm, cfg = load_language_model(path)
    vm, _ = load_vision_model(path, cfg=cfg)
    ours = sum(p.numel() for p in lm.parameters()) + sum(p.numel() for p in vm.parameters())
    assert ours == hf_params
    assert cfg.text.hidden_size >= 512 and cfg.text.num_hidden_layers >= 8 and cfg.text.num_experts >= 16
