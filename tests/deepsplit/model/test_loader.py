"""Weight loading: each half loads only its own tensors, strictly, with errors that name keys."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deepsplit.model.build import load_language_model, load_vision_model
from deepsplit.model.config import CheckpointError, ModelConfig
from deepsplit.model.loader import load_weights


def _disk_bytes(path, prefixes) -> int:
    total = 0
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        for k in f.keys():
            if k.startswith(prefixes):
                t = f.get_slice(k)
                n = 1
                for s in t.get_shape():
                    n *= s
                total += n * 4  # fp32 checkpoint
    return total


def test_text_half_holds_no_vision_weights(tiny_model_dir):
    lm, cfg = load_language_model(tiny_model_dir)
    names = [n for n, _ in lm.named_parameters()]
    assert not any("visual" in n or "patch_embed" in n or "merger" in n or "blocks." in n for n in names)
    held = sum(p.numel() * p.element_size() for p in lm.parameters())
    assert held == _disk_bytes(tiny_model_dir, ("model.language_model.", "lm_head."))


def test_vision_half_holds_no_text_weights(tiny_model_dir):
    vm, cfg = load_vision_model(tiny_model_dir)
    names = [n for n, _ in vm.named_parameters()]
    assert not any("embed_tokens" in n or "lm_head" in n or "experts" in n for n in names)
    held = sum(p.numel() * p.element_size() for p in vm.parameters())
    assert held == _disk_bytes(tiny_model_dir, ("model.visual.",))
    # and it is far smaller than the text half
    assert held < _disk_bytes(tiny_model_dir, ("model.language_model.", "lm_head.")) / 10


def _copy_with(tiny_model_dir, tmp_path, edit):
    dst = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


def test_missing_key_is_named(tiny_model_dir, tmp_path):
    key = "model.language_model.layers.1.self_attn.k_norm.weight"
    dst = _copy_with(tiny_model_dir, tmp_path, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match=r"missing \['model.layers.1.self_attn.k_norm.weight'\]"):
        load_language_model(dst)
    load_vision_model(dst)  # the vision half does not need that key


def test_unexpected_key_is_named(tiny_model_dir, tmp_path):
    dst = _copy_with(
        tiny_model_dir, tmp_path, lambda t: t.update({"model.visual.extra.weight": torch.zeros(2)})
    )
    with pytest.raises(CheckpointError, match="unexpected.*model.visual.extra.weight"):
        load_vision_model(dst)


def test_wrong_shape_is_named(tiny_model_dir, tmp_path):
    key = "model.language_model.norm.weight"
    dst = _copy_with(tiny_model_dir, tmp_path, lambda t: t.update({key: torch.zeros(3)}))
    with pytest.raises(CheckpointError, match="norm.weight: checkpoint shape"):
        load_language_model(dst)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="model_type='llama'"):
        ModelConfig.from_dir(tmp_path)


def test_progress_bar_does_not_change_result(tiny_model_dir):
    lm, cfg = load_language_model(tiny_model_dir)
    before = {n: p.clone() for n, p in lm.named_parameters()}
    load_weights(lm, tiny_model_dir, "text", progress=True)
    assert all(torch.equal(before[n], p) for n, p in lm.named_parameters())


def test_per_expert_checkpoint_layout_loads_identically(tiny_model_dir, tmp_path):
    """A checkpoint storing `mlp.experts.{e}.{gate,up,down}_proj.weight` packs into the same tensors."""

    def unfuse(t):
        for key in [k for k in t if k.endswith("mlp.experts.gate_up_proj")]:
            gu = t.pop(key)  # [E, H, 2I]
            inter = gu.shape[-1] // 2
            base = key[: -len("gate_up_proj")]
            down = t.pop(base + "down_proj")  # [E, I, H]
            for e in range(gu.shape[0]):
                t[f"{base}{e}.gate_proj.weight"] = gu[e, :, :inter].t().contiguous()
                t[f"{base}{e}.up_proj.weight"] = gu[e, :, inter:].t().contiguous()
                t[f"{base}{e}.down_proj.weight"] = down[e].t().contiguous()

    dst = _copy_with(tiny_model_dir, tmp_path, unfuse)
    ref, _ = load_language_model(tiny_model_dir)
    lm, _ = load_language_model(dst)
    for (n, a), (_, b) in zip(ref.named_parameters(), lm.named_parameters(), strict=True):
        assert torch.equal(a, b), n

    def drop_one(t):
        unfuse(t)
        t.pop("model.language_model.layers.0.mlp.experts.3.up_proj.weight")

    with pytest.raises(CheckpointError, match=r"missing \['model.layers.0.mlp.experts.gate_up_proj'\]"):
        load_language_model(_copy_with(tiny_model_dir, tmp_path / "b", drop_one))
