"""The operator's model flags: --model NAME=PATH, --models-file, --allow-model-path."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tether_server import app
from tether_server.config import ServerConfig
from tether_server.flags import parse_args
from tether_server.runtime import registry
from tether_server.tasks import llm_catalog


def parse(*argv: str) -> ServerConfig:
    config, _ = parse_args(list(argv))
    return config


def test_model_flags_name_absolute_directories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = parse("--model", "llama=models/llama", "--model", "qwen-0.5b=/srv/qwen")
    assert config.models == (
        ("llama", str(tmp_path / "models" / "llama")),
        ("qwen-0.5b", "/srv/qwen"),
    )
    assert config.model_path_roots == ()


def test_a_models_file_adds_models_relative_to_itself(tmp_path: Path) -> None:
    (tmp_path / "conf").mkdir()
    file = tmp_path / "conf" / "models.toml"
    file.write_text('[models]\nsmall = "weights/small"\nbig = "/srv/big"\n')
    config = parse("--models-file", str(file), "--allow-model-path", str(tmp_path))
    assert config.models == (
        ("small", str(tmp_path / "conf" / "weights" / "small")),
        ("big", "/srv/big"),
    )
    assert config.model_path_roots == (str(tmp_path),)


@pytest.mark.parametrize("flag", ["llama", "=/srv/x", "bad name=/srv/x", "llama="])
def test_a_malformed_model_flag_is_a_usage_error(flag: str) -> None:
    with pytest.raises(SystemExit):
        parse("--model", flag)


def test_a_model_name_given_twice_is_a_usage_error(tmp_path: Path) -> None:
    file = tmp_path / "models.toml"
    file.write_text('[models]\nllama = "/srv/a"\n')
    with pytest.raises(SystemExit):
        parse("--model", "llama=/srv/b", "--models-file", str(file))
    file.write_text("models = 3\n")
    with pytest.raises(SystemExit):
        parse("--models-file", str(file))


def test_a_checkpoint_directory_without_a_config_stops_the_server_at_start(
    tmp_path: Path,
) -> None:
    before = registry.settings()
    try:
        (tmp_path / "empty").mkdir()
        config = parse("--model", f"broken={tmp_path / 'empty'}")
        with pytest.raises(ValueError, match="broken="):
            asyncio.run(app.configure_models(config))
        config = parse("--model", f"missing={tmp_path / 'nowhere'}")
        with pytest.raises(ValueError, match="not a directory"):
            asyncio.run(app.configure_models(config))
    finally:
        registry.configure(before)


def test_the_flags_become_the_registry_settings_engines_receive(tmp_path: Path) -> None:
    before = registry.settings()
    try:
        asyncio.run(app.configure_models(parse("--allow-model-path", str(tmp_path))))
        assert llm_catalog.configured_models() == {}
        assert llm_catalog.model_path_roots() == [str(tmp_path)]
        assert registry.settings() == llm_catalog.operator_settings({}, [str(tmp_path)])
    finally:
        registry.configure(before)
