"""Load a role's settings: YAML file -> environment -> CLI flags, validated by a frozen pydantic model.

Each server declares its settings as a pydantic model with `extra="forbid"` and `frozen=True`;
`load_settings` merges the sources (later wins) and turns validation failures into one readable
`SettingsError` (unknown key, wrong type, bad port). It knows nothing of any particular role.
"""

from __future__ import annotations

import argparse
import os
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

T = TypeVar("T", bound=BaseModel)


class SettingsError(ValueError):
    pass


def _from_env(model: type[BaseModel], prefix: str) -> dict[str, Any]:
    out = {}
    for name in model.model_fields:
        value = os.environ.get(f"{prefix}{name.upper()}")
        if value is not None:
            out[name] = yaml.safe_load(value) if value.strip() else value
    return out


def load_settings(
    model: type[T],
    path: str | Path | None,
    overrides: dict[str, Any] | None = None,
    env_prefix: str | None = None,
) -> T:
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise SettingsError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise SettingsError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise SettingsError(f"config file {p} must hold a mapping of option: value")
        data.update(loaded)
    if env_prefix:
        data.update(_from_env(model, env_prefix))
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '(root)'}: {err['msg']}" for err in e.errors()
        )
        raise SettingsError(f"invalid {model.__name__} settings: {problems}") from None


def describe(settings: BaseModel) -> str:
    """One line per option, for the start-up log."""
    return "\n".join(f"  {k} = {v!r}" for k, v in settings.model_dump().items())


def _cli_value(text: str) -> Any:
    return yaml.safe_load(text) if text.strip() else text


def _comma_list(text: str) -> list[str]:
    return [x for x in text.split(",") if x]


def add_field_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """A `--kebab-name` flag for every field the parser does not define yet (explicit flags keep their
    own help). Booleans get --x/--no-x, lists take comma-separated values, the rest YAML scalars;
    the pydantic model validates whatever comes in."""
    taken = set(parser._option_string_actions)
    group = parser.add_argument_group("other options (same names as in the YAML settings file)")
    for name, field in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        if flag in taken:
            continue
        ann = field.annotation
        args = typing.get_args(ann)
        doc = (field.description or "").replace("%", "%%")
        default = field.default if field.default is not None else "null"
        help_ = f"{doc} (default: {default})" if doc else f"(default: {default})"
        if ann is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif typing.get_origin(ann) is list or any(typing.get_origin(a) is list for a in args):
            group.add_argument(flag, type=_comma_list, metavar="A,B,...", help=help_)
        else:
            group.add_argument(flag, type=_cli_value, metavar=name.upper(), help=help_)
