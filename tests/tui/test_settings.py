"""Settings precedence: flag > MOSHI_* variable > [command] table > top-level key > default."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moshi_tui.cli import app
from moshi_tui.settings import SettingsError, config_path, data_dir, default_map, read_config

OPTIONS = {"chat": {"device", "voice", "input_device"}, "transcribe": {"device"}}


def test_each_source_overrides_the_one_below():
    config = {"device": "cpu", "chat": {"device": "mps", "input-device": "USB"}}
    assert default_map(config, {}, OPTIONS) == {
        "chat": {"device": "mps", "input_device": "USB"},
        "transcribe": {"device": "cpu"},
    }
    env = {"MOSHI_DEVICE": "cuda", "MOSHI_VOICE": "moshiko", "MOSHI_DEBUG": "1", "HOME": "/x"}
    assert default_map(config, env, OPTIONS) == {
        "chat": {"device": "cuda", "input_device": "USB", "voice": "moshiko"},
        "transcribe": {"device": "cuda"},
    }


@pytest.mark.parametrize("config, message", [
    ({"devise": "cpu"}, "no command has an option --devise"),
    ({"chatt": {"device": "cpu"}}, "[chatt] is not a command (commands: chat, transcribe)"),
    ({"transcribe": {"voice": "moshiko"}}, "[transcribe]: `moshi transcribe` has no option --voice"),
])
def test_names_the_config_file_gets_wrong(config, message):
    with pytest.raises(SettingsError) as error:
        default_map(config, {}, OPTIONS)
    assert str(error.value) == f"the config file: {message}"


def test_a_broken_config_file_names_file_and_line(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('device = "cpu"\nvoice = \n')
    with pytest.raises(SettingsError, match=rf"config file {path}: .*line 2"):
        read_config(path)
    assert read_config(tmp_path / "absent.toml") == {}


def test_where_the_files_are(tmp_path):
    home = str(tmp_path)
    assert config_path({"MOSHI_CONFIG": "/etc/m.toml"}) == Path("/etc/m.toml")
    assert config_path({"XDG_CONFIG_HOME": home}) == tmp_path / "moshi" / "config.toml"
    assert data_dir({"XDG_DATA_HOME": home}) == tmp_path / "moshi"
    # a relative XDG path is invalid per the spec and ignored
    assert config_path({"XDG_CONFIG_HOME": "rel"}).parent.parent.name == ".config"


def _moshi(*args, env):
    return subprocess.run([sys.executable, "-m", "moshi_tui", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_the_cli_shows_settings_as_defaults(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('dtype = "float16"\n[chat]\nvoice = "moshiko"\n')
    out = _moshi("chat", "--help", env={"MOSHI_CONFIG": str(config), "MOSHI_DEVICE": "cuda"}).stdout
    assert "[default: moshiko]" in out and "[default: cuda]" in out and "[default: float16]" in out


def test_the_cli_reports_a_bad_config_in_one_line(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[chat]\nloudness = 11\n")
    result = _moshi("chat", "--help", env={"MOSHI_CONFIG": str(config)})
    assert result.returncode == 2
    assert result.stderr == f"moshi: error: {config}: [chat]: `moshi chat` has no option --loudness\n"


def test_flag_beats_variable_beats_config(tmp_path, monkeypatch):
    """Through the real app: `tiny-model --kind` says which kind it wrote."""
    config = tmp_path / "config.toml"
    config.write_text('[tiny-model]\nkind = "transcribe"\n')
    monkeypatch.setenv("MOSHI_CONFIG", str(config))
    runner = CliRunner()
    result = runner.invoke(app, ["tiny-model", str(tmp_path / "a")])
    assert "tiny random transcribe model" in result.output
    result = runner.invoke(app, ["tiny-model", str(tmp_path / "b")], env={"MOSHI_KIND": "chat"})
    assert "tiny random chat model" in result.output
    result = runner.invoke(app, ["tiny-model", str(tmp_path / "c"), "--kind", "transcribe"], env={"MOSHI_KIND": "chat"})
    assert "tiny random transcribe model" in result.output


def test_the_files_of_a_run_never_come_from_the_environment_or_the_config_file():
    options = {"chat": {"device", "input", "output", "transcript", "record"}, "transcribe": {"output_dir"}}
    env = {"MOSHI_INPUT": "/etc/passwd", "MOSHI_OUTPUT": "x.wav", "MOSHI_RECORD": "/tmp", "MOSHI_OUTPUT_DIR": "o",
           "MOSHI_DEVICE": "cuda"}
    assert default_map({}, env, options) == {"chat": {"device": "cuda"}, "transcribe": {}}
    for config in ({"input": "a.wav"}, {"chat": {"transcript": "t.txt"}}, {"transcribe": {"output-dir": "o"}}):
        with pytest.raises(SettingsError, match="belongs to one run: give it on the command line"):
            default_map(config, {}, options)


def test_a_bad_value_is_reported_with_where_it_came_from(tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('[chat]\ntemp = "hot"\n')
    result = _moshi("chat", "--no-tui", env={"MOSHI_CONFIG": str(tmp_path / "none.toml"), "MOSHI_DTYPE": "float64"})
    assert result.returncode == 2 and result.stderr.startswith("moshi: error: MOSHI_DTYPE=float64: ")
    assert len(result.stderr.splitlines()) == 1 and "--dtype" not in result.stderr
    result = _moshi("chat", "--no-tui", env={"MOSHI_CONFIG": str(config)})
    assert result.returncode == 2 and result.stderr.startswith(f"moshi: error: {config}: [chat] temp = 'hot': ")
    assert _moshi("devices", "--help", env={"MOSHI_CONFIG": str(config)}).returncode == 0  # not its option
