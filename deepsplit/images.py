"""Turn an OpenAI `image_url` into a decoded RGB image, safely, or fail with a reason a client can read.

Shared by the encode server and the language server's monolithic mode. `data:` URLs are always
accepted; `http(s)` only when the caller allows it; other schemes never. Size, pixel count
(decompression bombs), truncation and undecodable bytes all raise `BadImage` with a message that
names the problem. It does no resizing: that is the image processor's job.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from dataclasses import dataclass

from PIL import Image, UnidentifiedImageError


class BadImage(ValueError):
    """The image input is unusable; the message is safe to show to the client."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 2**20  # encoded size
    max_pixels: int = 40_000_000  # width * height before any resize (decompression-bomb guard)
    min_side: int = 1
    max_aspect_ratio: float = 200.0
    allow_http: bool = False
    http_timeout_s: float = 10.0


def fetch_bytes(url: str, limits: ImageLimits) -> bytes:
    if not isinstance(url, str) or not url:
        raise BadImage("image_url.url must be a non-empty string")
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep:
            raise BadImage("malformed data: URL (no comma)")
        if ";base64" not in header:
            raise BadImage("data: URL images must be base64-encoded")
        if len(payload) * 3 // 4 > limits.max_bytes:
            raise BadImage(f"image larger than {limits.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as e:
            raise BadImage(f"data: URL is not valid base64: {e}") from None
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        if not limits.allow_http:
            raise BadImage("http(s) image URLs are disabled on this server; send a data: URL")
        return _download(url, limits)
    raise BadImage(f"unsupported image URL scheme {scheme or url[:16]!r}; use a data: URL")


def _download(url: str, limits: ImageLimits) -> bytes:
    import httpx

    try:
        with httpx.stream("GET", url, timeout=limits.http_timeout_s, follow_redirects=True) as r:
            if r.status_code != 200:
                raise BadImage(f"fetching the image returned HTTP {r.status_code}")
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > limits.max_bytes:
                    raise BadImage(f"image larger than {limits.max_bytes} bytes")
            return bytes(buf)
    except httpx.HTTPError as e:
        raise BadImage(f"could not fetch the image: {e}") from None


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    if not data:
        raise BadImage("image data is empty")
    if len(data) > limits.max_bytes:
        raise BadImage(f"image larger than {limits.max_bytes} bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            w, h = img.size
            if w * h > limits.max_pixels:
                raise BadImage(f"image has {w}x{h} pixels, more than the limit of {limits.max_pixels}")
            if min(w, h) < limits.min_side:
                raise BadImage(f"image is {w}x{h}, smaller than {limits.min_side} pixel(s) on a side")
            if max(w, h) / min(w, h) > limits.max_aspect_ratio:
                raise BadImage(f"image aspect ratio {w}x{h} exceeds {limits.max_aspect_ratio:g}:1")
            img.load()  # full decode: truncated files fail here
            return img.convert("RGB")
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"image rejected as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("image data is not a recognised image format") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImage(f"image could not be decoded (truncated or corrupt): {e}") from None


def load_image(url: str, limits: ImageLimits) -> tuple[Image.Image, bytes]:
    """-> (RGB image, the encoded bytes it came from — the cache key material)."""
    data = fetch_bytes(url, limits)
    return decode_image(data, limits), data


def image_urls(messages: list[dict]) -> list[str]:
    """The image URLs of OpenAI chat messages, in prompt order."""
    urls = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    iu = part.get("image_url")
                    urls.append(iu.get("url") if isinstance(iu, dict) else iu)
    return urls
