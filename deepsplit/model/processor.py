"""Prompt and image preprocessing for Qwen3-VL: chat template, image processor, placeholder expansion.

`Preprocessor.from_dir(dir)` reads the checkpoint's tokenizer, chat template and image-processor
config. `prepare(messages, images)` returns the expanded prompt ids (one `<|image_pad|>` per vision
row), the pixel patches and each image's grid. It knows nothing of the model or the servers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from deepsplit.model.config import CheckpointError


@dataclass
class PreparedPrompt:
    input_ids: list[int]  # expanded prompt ids (image pads included)
    pixel_values: torch.Tensor | None  # [P, C*T*p*p] float32
    grid_thw: list[list[int]]  # per image [t, h, w] in patches

    @property
    def num_images(self) -> int:
        return len(self.grid_thw)


class Preprocessor:
    def __init__(
        self, tokenizer, image_processor, chat_template: str, image_token: str = "<|image_pad|>"
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.chat_template = chat_template
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.merge_size = image_processor.merge_size

    @classmethod
    def from_dir(cls, path: str | Path, max_pixels: int | None = None) -> Preprocessor:
        from transformers import AutoTokenizer
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        path = Path(path)
        template_file = path / "chat_template.jinja"
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        if template_file.is_file():
            template = template_file.read_text()
        elif getattr(tokenizer, "chat_template", None):
            template = tokenizer.chat_template
        else:
            raise CheckpointError(f"{path} has no chat template (chat_template.jinja)")
        kwargs = {}
        if max_pixels:
            kwargs["size"] = {"shortest_edge": 32 * 32, "longest_edge": max_pixels}
        image_processor = Qwen2VLImageProcessorPil.from_pretrained(str(path), **kwargs)
        return cls(tokenizer, image_processor, template)

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            add_generation_prompt=add_generation_prompt,
            tokenize=False,
        )

    def images_to_patches(self, images: list) -> tuple[torch.Tensor | None, list[list[int]]]:
        if not images:
            return None, []
        out = self.image_processor(images=images, return_tensors="pt")
        return out["pixel_values"].float(), out["image_grid_thw"].tolist()

    def rows_for(self, grid: list[int]) -> int:
        t, h, w = grid
        return t * h * w // self.merge_size**2

    def expand(self, text: str, grid_thw: list[list[int]]) -> list[int]:
        """Tokenise `text`, widening its i-th image placeholder to that image's number of rows."""
        parts = text.split(self.image_token)
        if len(parts) - 1 != len(grid_thw):
            raise ValueError(f"prompt has {len(parts) - 1} image placeholders but {len(grid_thw)} images")
        pieces = [parts[0]]
        for grid, rest in zip(grid_thw, parts[1:], strict=False):
            pieces.append(self.image_token * self.rows_for(grid))
            pieces.append(rest)
        return self.tokenizer("".join(pieces), add_special_tokens=False)["input_ids"]

    def prepare(
        self, messages: list[dict], images: list, add_generation_prompt: bool = True
    ) -> PreparedPrompt:
        pixel_values, grid = self.images_to_patches(images)
        ids = self.expand(self.render(messages, add_generation_prompt), grid)
        return PreparedPrompt(ids, pixel_values, grid)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
