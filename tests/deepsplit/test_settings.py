"""Settings of every role (encode, language, cluster): the shipped YAML documents and validates every
option; unknown keys, wrong types and bad ports stop start-up with a clear message; the environment
overrides the file and flags override both; every option is also a flag."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest
import yaml

from deepsplit.settings import SettingsError, add_field_flags, load_settings

ROOT = Path(__file__).resolve().parents[2]
ROLES = {
    "encode": ("encode_server.config:EncodeSettings", "DEEPSPLIT_ENCODE_", "encode_server.cli"),
    "language": ("language_server.config:LanguageSettings", "DEEPSPLIT_LANGUAGE_", "language_server.cli"),
    "cluster": ("deepsplit.cluster:ClusterSettings", None, None),
}


def model_of(role: str):
    module, _, name = ROLES[role][0].partition(":")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("role", list(ROLES))
def test_shipped_config_documents_every_option(role):
    path = ROOT / "configs" / f"{role}.yaml"
    assert set(yaml.safe_load(path.read_text())) == set(model_of(role).model_fields)
    load_settings(model_of(role), path)  # valid as shipped


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize(
    "bad,words",
    [
        ({"no_such_option": 1}, ["no_such_option", "Extra inputs"]),
        ({"port": 70000}, ["port"]),
        ({"host": ["a", "b"]}, ["host"]),
    ],
)
def test_bad_values_are_clear_errors(role, bad, words, tmp_path):
    if role == "cluster" and "port" in bad:
        bad = {"language_base_port": 70000}
        words = ["language_base_port"]
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model": "/m", **bad}))
    with pytest.raises(SettingsError) as e:
        load_settings(model_of(role), cfg)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_missing_or_broken_file():
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(model_of("encode"), "/nowhere.yaml")


@pytest.mark.parametrize("role", ["encode", "language"])
def test_env_overrides_file_and_flags_override_env(role, tmp_path, monkeypatch):
    _, prefix, cli = ROLES[role]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"model": "/m", "port": 1000, "log_level": "debug"}))
    monkeypatch.setenv(prefix + "PORT", "2000")
    monkeypatch.setenv(prefix + "LOG_LEVEL", "warning")
    args = importlib.import_module(cli).parse_args(["--config", str(cfg), "--log-level", "error"])
    over = {k: v for k, v in vars(args).items() if k != "config"}
    s = load_settings(model_of(role), cfg, over, env_prefix=prefix)
    assert (s.port, s.log_level) == (2000, "error")


@pytest.mark.parametrize("role", ["encode", "language"])
def test_every_option_is_a_flag(role):
    cli = importlib.import_module(ROLES[role][2])
    p = argparse.ArgumentParser()
    add_field_flags(p, model_of(role))
    flags = set(p._option_string_actions)
    for name in model_of(role).model_fields:
        assert "--" + name.replace("_", "-") in flags
    # typed parsing: lists comma-separated, booleans --x/--no-x, scalars as YAML
    first_list = next(n for n, f in model_of(role).model_fields.items() if "list" in str(f.annotation))
    args = cli.parse_args([f"--{first_list.replace('_', '-')}", "a,b", "--port", "7"])
    assert getattr(args, first_list) == ["a", "b"] and args.port == 7
