"""Fixtures for model fidelity tests: our halves on the tiny checkpoint and a prompt factory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session")
def ours(tiny_model_dir):
    from deepsplit.model.build import load_language_model, load_vision_model
    from deepsplit.model.processor import Preprocessor

    lm, cfg = load_language_model(tiny_model_dir)
    vm, _ = load_vision_model(tiny_model_dir, cfg=cfg)
    return lm, vm, cfg, Preprocessor.from_dir(tiny_model_dir)


def make_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


# name -> (content parts with "IMG" markers, image sizes)
PROMPTS = {
    "text": (["Tell me a story about a fox."], []),
    "one_image": (["IMG", "Describe this image."], [(64, 96)]),
    "three_images": (["Compare", "IMG", "with", "IMG", "and", "IMG"], [(64, 64), (96, 48), (128, 160)]),
    "image_start": (["IMG", "What is here?"], [(80, 80)]),
    "image_middle": (["Look at", "IMG", "then answer: what colour dominates?"], [(48, 112)]),
    "image_end": (["The picture is:", "IMG"], [(112, 64)]),
}


def build_prompt(pre, name: str, seed: int = 0):
    parts, sizes = PROMPTS[name]
    content, images = [], []
    for p in parts:
        if p == "IMG":
            h, w = sizes[len(images)]
            images.append(make_image(h, w, seed + len(images)))
            content.append({"type": "image"})
        else:
            content.append({"type": "text", "text": p})
    return pre.prepare([{"role": "user", "content": content}], images)


def hf_inputs(prepared, cfg) -> dict:
    ids = torch.tensor([prepared.input_ids])
    kw = {"input_ids": ids}
    if prepared.grid_thw:
        kw.update(
            pixel_values=prepared.pixel_values,
            image_grid_thw=torch.tensor(prepared.grid_thw),
            mm_token_type_ids=(ids == cfg.image_token_id).int(),
        )
    return kw
