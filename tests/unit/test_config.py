from pathlib import Path

import pytest

from bootstrap.config import Config, load
from bootstrap.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "metalseed.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_env_or_flags(monkeypatch, tmp_path):
    monkeypatch.setattr("bootstrap.config.DEFAULT_CONFIG_FILE", tmp_path / "absent.toml")
    assert load(None, env={}) == Config()
    assert Config().state_dir == Path("/var/lib/metalseed")


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch, tmp_path):
    monkeypatch.setattr("bootstrap.config.DEFAULT_CONFIG_FILE", tmp_path / "no-system.toml")


def test_precedence_is_file_then_env_then_flags(tmp_path):
    path = write(tmp_path, 'state_dir = "/from/file"\n[bmc]\ntimeout = 1.5\nattempts = 7\n')
    env = {"METALSEED_STATE_DIR": "/from/env", "METALSEED_BMC_TIMEOUT": "2.5"}
    config = load(path, env=env, flags={"state_dir": Path("/from/flag"), "bmc.timeout": None})
    assert config.state_dir == Path("/from/flag")  # flag beats env and file
    assert config.bmc.timeout == 2.5  # env beats file; a flag of None means "not given"
    assert config.bmc.attempts == 7  # only the file set it


def test_config_file_from_environment_variable(tmp_path):
    path = write(tmp_path, "[discovery]\nranges = ['10.0.0.0/24', '10.0.1.5']\nrotate = true\n")
    config = load(None, env={"METALSEED_CONFIG": str(path)})
    assert config.discovery.ranges == ("10.0.0.0/24", "10.0.1.5")
    assert config.discovery.rotate is True


def test_env_lists_are_comma_separated_and_booleans_parsed():
    config = load(
        None,
        env={
            "METALSEED_DISCOVERY_RANGES": "10.0.0.1, 10.0.0.2",
            "METALSEED_DISCOVERY_ROTATE": "yes",
        },
    )
    assert config.discovery.ranges == ("10.0.0.1", "10.0.0.2")
    assert config.discovery.rotate is True


@pytest.mark.parametrize(
    "text,message",
    [
        ("colour = 'blue'\n", "unknown key colour"),
        ("[bmc]\nspeed = 1\n", "unknown key bmc.speed"),
        ("[bmc]\ntimeout = 'soon'\n", "bmc.timeout"),
        ("[bmc]\nattempts = 0\n", "at least 1"),
        ("state_dir = \n", "not valid TOML"),
        ("bmc = 3\n", "must be a table"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load(write(tmp_path, text), env={})


def test_missing_named_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.toml", env={})


def test_bad_env_value_names_the_key():
    with pytest.raises(ConfigError, match="bmc.port"):
        load(None, env={"METALSEED_BMC_PORT": "lots"})


def test_config_is_frozen():
    config = load(None, env={})
    with pytest.raises(AttributeError):
        config.state_dir = Path("/elsewhere")  # type: ignore[misc]
