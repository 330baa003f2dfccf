"""Settings from a config file and ``MOSHI_*`` environment variables, under the flags.

For every option of every command, the first of these that is set wins:

1. the flag on the command line;
2. ``MOSHI_<OPTION>`` in the environment (``MOSHI_INPUT_DEVICE=USB`` for ``--input-device``);
3. the command's table in the config file (``[chat]`` ``voice = "moshiko"``);
4. a top-level key of the config file, shared by the commands that have that option;
5. the built-in default.

The config file is TOML at ``$MOSHI_CONFIG``, else ``$XDG_CONFIG_HOME/moshi/config.toml``
(``~/.config/moshi/config.toml``). Keys are option names with dashes or underscores.
Steps 2-4 become Click's ``default_map``, which Click ranks below the command line.

Only settings come from the environment and the config file, never the files of one run
(`PER_RUN`: ``--input``, ``--output``, ``-o``, ``--record``…): a ``MOSHI_INPUT`` is left alone, and a
config file that names one is an error. A bad value is reported with where it came from
(``MOSHI_DTYPE=float64: …``), before the command runs.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "MOSHI_"
NOT_OPTIONS = {"DEBUG", "CONFIG"}  # MOSHI_* variables with a meaning of their own
# Options that name what one run reads or writes, or how it treats them: the command line's alone.
PER_RUN = {"input", "output", "transcript", "record", "output_dir", "raw", "rate", "force"}


class SettingsError(Exception):
    """The config file cannot be read or names something that does not exist."""


def config_path(environ: Mapping[str, str] = os.environ) -> Path:
    if environ.get("MOSHI_CONFIG"):
        return Path(environ["MOSHI_CONFIG"]).expanduser()
    return _xdg(environ, "XDG_CONFIG_HOME", ".config") / "moshi" / "config.toml"


def data_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where conversations are recorded when no --record folder is given."""
    return _xdg(environ, "XDG_DATA_HOME", ".local/share") / "moshi"


def cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """Where torch keeps what it compiles (instead of a folder it would leave in $TMPDIR)."""
    return _xdg(environ, "XDG_CACHE_HOME", ".cache") / "moshi"


def _xdg(environ: Mapping[str, str], name: str, fallback: str) -> Path:
    value = environ.get(name, "")
    # The XDG spec: relative paths are invalid and must be ignored.
    return Path(value) if os.path.isabs(value) else Path.home() / fallback


def read_config(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise SettingsError(f"cannot read the config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path}: {exc}") from exc
    except UnicodeDecodeError:
        raise SettingsError(f"config file {path} is not UTF-8 text") from None


def _name(key: str) -> str:
    return key.replace("-", "_").lower()


def default_map(config: Mapping[str, Any], environ: Mapping[str, str], options: Mapping[str, set[str]],
                source: str = "the config file") -> dict[str, dict[str, Any]]:
    """Per-command defaults from the config file and the environment. `options` maps each command
    to the names of its options. Names the config file gets wrong are errors; unknown MOSHI_*
    variables are left alone (they may belong to something else)."""
    shared = {_name(k): v for k, v in config.items() if not isinstance(v, dict)}
    sections = {k: {_name(n): x for n, x in v.items()} for k, v in config.items() if isinstance(v, dict)}
    everywhere = set().union(*options.values()) if options else set()
    for key in [*shared, *(k for table in sections.values() for k in table)]:
        if key in PER_RUN:
            raise SettingsError(f"{source}: --{key.replace('_', '-')} belongs to one run: give it on the command line")
    for key in shared:
        if key not in everywhere:
            raise SettingsError(f"{source}: no command has an option --{key.replace('_', '-')}")
    for command, table in sections.items():
        if command not in options:
            raise SettingsError(f"{source}: [{command}] is not a command (commands: {', '.join(sorted(options))})")
        for key in table:
            if key not in options[command]:
                raise SettingsError(f"{source}: [{command}]: `moshi {command}` has no option --{key.replace('_', '-')}")
    env = {
        _name(k[len(ENV_PREFIX):]): v
        for k, v in environ.items()
        if k.startswith(ENV_PREFIX) and k[len(ENV_PREFIX):] not in NOT_OPTIONS
    }
    env = {k: v for k, v in env.items() if k not in PER_RUN}
    result = {}
    for command, names in options.items():
        merged = {**shared, **sections.get(command, {}), **env}
        result[command] = {k: v for k, v in merged.items() if k in names}
    return result


def apply(ctx: Any, environ: Mapping[str, str] = os.environ) -> None:
    """Install the defaults on the root Click context of the ``moshi`` app (call from its callback).
    A broken config file is a one-line error and exit status 2, like a bad flag."""
    group = ctx.command
    options = {
        name: {p.name for p in command.params if p.param_type_name == "option"}
        for name, command in group.commands.items()
    }
    path = config_path(environ)
    try:
        config = read_config(path)
        ctx.default_map = default_map(config, environ, options, source=str(path))
        command = ctx.invoked_subcommand
        if command in group.commands:
            _check_values(ctx, group.commands[command], config, environ, str(path))
    except SettingsError as exc:
        print(f"moshi: error: {exc}", file=sys.stderr)
        ctx.exit(2)


def _check_values(ctx: Any, command: Any, config: Mapping[str, Any], environ: Mapping[str, str], source: str) -> None:
    """Each default the command takes from the environment or the config file converts as its flag
    would; a bad one is a `SettingsError` that names where it came from."""
    from typer import BadParameter

    params = {p.name: p for p in command.params}
    for key, value in ctx.default_map.get(command.name, {}).items():
        try:
            params[key].process_value(ctx, value)
        except BadParameter as exc:
            origin = _origin(command.name, key, value, config, environ, source)
            raise SettingsError(f"{origin}: {exc.message}") from None


def _origin(command: str, key: str, value: Any, config: Mapping[str, Any], environ: Mapping[str, str],
            source: str) -> str:
    variable = ENV_PREFIX + key.upper()
    if variable in environ:
        return f"{variable}={value}"
    table = {_name(k) for k in config.get(command, {})} if isinstance(config.get(command), dict) else set()
    return f"{source}: [{command}] {key} = {value!r}" if key in table else f"{source}: {key} = {value!r}"
