"""CLI and settings: --help, the shipped YAML documents and validates every option, bad configs fail
clearly at start (unknown key, wrong type), flags override the file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from deepsplit.settings import SettingsError, load_settings
from language_server.cli import main, parse_args
from language_server.config import LanguageSettings

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "language.yaml"


def test_help_lists_the_main_options(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--model",
        "--config",
        "--port",
        "--api-key",
        "--mode",
        "--kv-cache-bytes",
        "--max-num-seqs",
    ):
        assert flag in out


def test_shipped_config_is_valid_and_documents_every_option():
    keys = set(yaml.safe_load(CONFIG.read_text()))
    assert keys == set(LanguageSettings.model_fields)
    s = load_settings(LanguageSettings, CONFIG)
    assert s.mode == "monolithic" and s.port == 30000


def test_flags_override_the_file():
    args = parse_args(["--config", str(CONFIG), "--port", "1234", "--max-num-seqs", "3"])
    overrides = {k: v for k, v in vars(args).items() if k != "config"}
    s = load_settings(LanguageSettings, args.config, overrides)
    assert (s.port, s.max_num_seqs, s.block_size) == (1234, 3, 16)
    with pytest.raises(Exception):  # noqa: B017 - frozen
        s.port = 1


@pytest.mark.parametrize(
    "extra,words",
    [
        ({"max_num_seqz": 3}, ["max_num_seqz", "Extra inputs"]),
        ({"port": "eighty"}, ["port"]),
        ({"mode": "both"}, ["mode"]),
    ],
)
def test_bad_config_stops_the_server_with_a_clear_message(tmp_path, capsys, extra, words):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump({"model": "/nowhere", **extra}))
    assert main(["--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in words), err
    with pytest.raises(SettingsError):
        load_settings(LanguageSettings, cfg)
