"""The seam between the engine and whoever computes a prompt's vision rows.

`MultimodalInputs` is exactly what the transfer layer's received request carries, plus a callback
that frees its buffer blocks; `MultimodalProvider.prepare` produces one for a chat request. The
monolithic provider runs the vision tower here; the disaggregated one (encode servers + transfer/)
plugs in behind the same interface. Providers know nothing of the scheduler or the KV cache.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

import torch


class BadMultimodalInput(ValueError):
    """The request's images/messages are unusable (-> HTTP 400); the message is safe for clients."""


class EncoderUnavailable(RuntimeError):
    """No encoder could produce the rows (-> HTTP 503)."""


@dataclass
class MultimodalInputs:
    fill_ids: torch.Tensor  # [N] long: expanded prompt ids, one image pad per vision row
    positions: torch.Tensor  # [3, N] long: M-RoPE positions
    mrope_delta: int  # decode token at index p sits at p + delta on every axis
    embeddings: torch.Tensor  # [V, H]: vision rows in the order of the pads
    deepstack: torch.Tensor  # [V, n_ds * H]
    on_consumed: Callable[[], None] | None = None  # frees the rows' buffer blocks; called once

    def release(self) -> None:
        """Call `on_consumed` at most once (after the last prefill chunk, or on abort)."""
        cb, self.on_consumed = self.on_consumed, None
        if cb is not None:
            cb()

    @property
    def num_tokens(self) -> int:
        return int(self.fill_ids.numel())


class MultimodalProvider(abc.ABC):
    @abc.abstractmethod
    async def prepare(self, request_id: str, messages: list[dict], images: list[str]) -> MultimodalInputs:
        """`images`: the request's image URLs in prompt order. Raises BadMultimodalInput / EncoderUnavailable."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release threads/connections."""

    def buffer_usage(self) -> tuple[int, int] | None:
        """(used, total) receive-buffer blocks, for /metrics; None when the provider has no pool."""
        return None
