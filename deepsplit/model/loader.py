"""Load HF safetensors weights by name into our modules, strictly, per half of the model.

`part="text"` loads `model.language_model.*` and `lm_head.*` into a `Qwen3MoeForCausalLM`;
`part="vision"` loads `model.visual.*` into a `VisionModel`. Only the wanted tensors are read from
disk (safetensors is lazy); missing or unexpected keys are errors that name them.
"""

from __future__ import annotations

import json
import re
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


# Checkpoints that store each expert separately (`mlp.experts.{e}.gate_proj.weight`, [I, H]) are
# packed into our fused tensors: name -> (fused parameter, which part of it), declared as data.
UNFUSED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
FUSED_TARGET = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def _place(p: torch.Tensor, name: str, key: str, t: torch.Tensor) -> str:
    """Copy checkpoint tensor `t` (our name `name`) into parameter `p`; returns the coverage unit."""
    m = UNFUSED_EXPERT.match(name)
    if m:
        e, part = int(m.group(2)), m.group(3)
        inter = p.shape[-1] // 2 if part != "down_proj" else p.shape[1]
        dst = {"gate_proj": p[e, :, :inter], "up_proj": p[e, :, inter:], "down_proj": p[e]}[part]
        t = t.t()
        unit = f"{m.group(1)}.{FUSED_TARGET[part]}#{e}.{part}"
    else:
        dst, unit = p, name
    if tuple(t.shape) != tuple(dst.shape):
        raise CheckpointError(f"{key}: checkpoint shape {tuple(t.shape)} != model {tuple(dst.shape)}")
    dst.copy_(t)
    return unit


def _param_name(name: str) -> str:
    m = UNFUSED_EXPERT.match(name)
    return f"{m.group(1)}.{FUSED_TARGET[m.group(3)]}" if m else name


def _covered(params: dict[str, torch.Tensor], units: set[str]) -> set[str]:
    """Parameters fully written: directly, or every expert and part of a fused one."""
    done = {u for u in units if "#" not in u}
    packed: dict[str, int] = {}
    for u in units:
        if "#" in u:
            packed[u.split("#")[0]] = packed.get(u.split("#")[0], 0) + 1
    for name, n in packed.items():
        parts = 1 if name.endswith("down_proj") else 2
        if n == params[name].shape[0] * parts:
            done.add(name)
    return done


def load_weights(module: nn.Module, path: str | Path, part: str, progress: bool | None = None) -> int:
    """Copy the checkpoint's `part` tensors into `module`; returns bytes loaded."""
    prefixes = PREFIXES[part]
    params = dict(module.named_parameters())
    units: set[str] = set()
    unexpected: list[str] = []
    loaded = 0
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for f in checkpoint_files(path):
        with safe_open(str(f), framework="pt") as sf:
            for key in sf.keys():
                name = _map(key, prefixes)
                if name is not None:
                    by_file.setdefault(f, []).append((key, name))
    bar = _progress(sum(len(v) for v in by_file.values()), progress, part)
    with torch.no_grad():
        for f, items in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for key, name in items:
                    target = _param_name(name)
                    if target not in params:
                        unexpected.append(key)
                        continue
                    t = sf.get_tensor(key)
                    units.add(_place(params[target], name, key, t))
                    loaded += t.numel() * t.element_size()
                    bar.update(1)
    bar.close()
    missing = sorted(set(params) - _covered(params, units))
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
