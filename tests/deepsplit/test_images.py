"""Image intake: every way an image can be bad gets a BadImage naming the problem."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from deepsplit.images import BadImage, ImageLimits, image_urls, load_image


def data_url(img: Image.Image, fmt: str = "PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def rgb(h: int, w: int) -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(h, w, 3) * 255).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_png_and_jpeg_decode(fmt):
    img, raw = load_image(data_url(rgb(20, 30), fmt), ImageLimits())
    assert img.size == (30, 20) and img.mode == "RGB" and len(raw) > 0


def test_not_an_image():
    url = "data:image/png;base64," + base64.b64encode(b"hello, not an image").decode()
    with pytest.raises(BadImage, match="not a recognised image"):
        load_image(url, ImageLimits())


def test_truncated_png():
    url = data_url(rgb(64, 64))
    raw = base64.b64decode(url.split(",", 1)[1])
    cut = "data:image/png;base64," + base64.b64encode(raw[: len(raw) // 2]).decode()
    with pytest.raises(BadImage, match="truncated or corrupt"):
        load_image(cut, ImageLimits())


def test_decompression_bomb():
    big = Image.new("RGB", (8000, 8000))  # compresses to a few KB, decodes to 192 MB
    with pytest.raises(BadImage, match="pixels|decompression bomb"):
        load_image(data_url(big), ImageLimits(max_pixels=10_000_000))


@pytest.mark.parametrize(
    "url,match",
    [
        ("ftp://example.com/a.png", "unsupported image URL scheme"),
        ("file:///etc/passwd", "unsupported image URL scheme"),
        ("http://127.0.0.1:1/a.png", "disabled"),
        ("data:image/png;base64,@@@", "not valid base64"),
        ("data:image/png,abc", "base64-encoded"),
        ("", "non-empty"),
    ],
)
def test_bad_urls(url, match):
    with pytest.raises(BadImage, match=match):
        load_image(url, ImageLimits())


def test_extreme_aspect_rejected_and_tiny_accepted():
    with pytest.raises(BadImage, match="aspect ratio"):
        load_image(data_url(rgb(1, 4000)), ImageLimits())
    img, _ = load_image(data_url(rgb(1, 1)), ImageLimits())
    assert img.size == (1, 1)


def test_too_large_encoded():
    with pytest.raises(BadImage, match="larger than"):
        load_image(data_url(rgb(64, 64)), ImageLimits(max_bytes=100))


def test_image_urls_in_order():
    msgs = [
        {"role": "system", "content": "x"},
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "a"}}, {"type": "text", "text": "t"}],
        },
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "b"}}]},
    ]
    assert image_urls(msgs) == ["a", "b"]
