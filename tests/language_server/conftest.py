"""Language-server test helpers: images as data: URLs, an in-process engine on the tiny checkpoint."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import torch_threads


def make_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    mime = "jpeg" if fmt == "JPEG" else fmt.lower()
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_message(text: str, urls: list[str]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def start_engine(model_dir, **overrides):
    from language_server.config import LanguageSettings
    from language_server.server import build_engine

    built = build_engine(LanguageSettings(model=str(model_dir), threads=torch_threads, **overrides))
    built.engine.start(torch_threads)
    return built


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    built = start_engine(tiny_model_dir, max_num_batched_tokens=64, block_size=8)
    yield built
    built.engine.stop()
