"""Load HF safetensors weights by name into our modules, strictly, per half of the model.

`part="text"` loads `model.language_model.*` and `lm_head.*` into a `Qwen3MoeForCausalLM`;
`part="vision"` loads `model.visual.*` into a `VisionModel`. Only the wanted tensors are read from
disk (safetensors is lazy); missing or unexpected keys are errors that name them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from deepsplit.model.config import CheckpointError

PREFIXES = {
    "text": {"model.language_model.": "model.", "lm_head.": "lm_head."},
    "vision": {"model.visual.": ""},
}


def checkpoint_files(path: str | Path) -> list[Path]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path} has no *.safetensors weights")
    return files


def load_weights(module: nn.Module, path: str | Path, part: str, progress: bool | None = None) -> int:
    """Copy the checkpoint's `part` tensors into `module`; returns bytes loaded."""
    prefixes = PREFIXES[part]
    params = dict(module.named_parameters())
    seen: set[str] = set()
    unexpected: list[str] = []
    loaded = 0
    files = checkpoint_files(path)
    keys = []
    for f in files:
        with safe_open(str(f), framework="pt") as sf:
            keys += [(f, k) for k in sf.keys()]
    wanted = [(f, k, _map(k, prefixes)) for f, k in keys]
    wanted = [(f, k, n) for f, k, n in wanted if n is not None]
    total = sum(1 for _ in wanted)
    bar = _progress(total, progress, part)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for f, k, n in wanted:
        by_file.setdefault(f, []).append((k, n))
    with torch.no_grad():
        for f, items in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for key, name in items:
                    if name not in params:
                        unexpected.append(key)
                        continue
                    t = sf.get_tensor(key)
                    p = params[name]
                    if tuple(t.shape) != tuple(p.shape):
                        raise CheckpointError(
                            f"{key}: checkpoint shape {tuple(t.shape)} != model {tuple(p.shape)}"
                        )
                    p.copy_(t)
                    seen.add(name)
                    loaded += t.numel() * t.element_size()
                    bar.update(1)
    bar.close()
    missing = sorted(set(params) - seen)
    if missing or unexpected:
        raise CheckpointError(
            f"{part} weights of {path} do not match the model: missing {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    return loaded


def _map(key: str, prefixes: dict[str, str]) -> str | None:
    for src, dst in prefixes.items():
        if key.startswith(src):
            return dst + key[len(src) :]
    return None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, progress: bool | None, part: str):
    if progress is None:
        progress = total > 500
    if not progress:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=f"loading {part} weights", unit="tensor")
