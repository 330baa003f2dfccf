"""The ``moshi`` command. Each command group lives in its own module under ``commands/``.

Importing this module must stay cheap: ``moshi --help`` never imports torch. Commands import
the engine inside their function bodies.
"""

from __future__ import annotations

import os
import sys

import typer

from audio.errors import AudioError
from engine.env import env_flag
from engine.errors import EngineError

from . import __version__, settings
from .commands import chat, devices, doctor, models, see, serve, tiny_model, transcribe
from .commands.common import Command
from .commands.download import download
from .errors import ArgumentError

app = typer.Typer(
    name="moshi",
    help="Talk with Moshi, talk about a picture, or transcribe speech, in the terminal.",
    no_args_is_help=True,
    rich_markup_mode=None,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"moshi {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Talk with Moshi, talk about a picture, or transcribe speech, in the terminal."""
    settings.apply(ctx)  # config file and MOSHI_* variables become the commands' defaults


app.command()(download)
models.register(app)
chat.register(app)
see.register(app)
transcribe.register(app)
serve.register(app)
tiny_model.register(app)
doctor.register(app)
devices.register(app)
for registered in app.registered_commands:
    registered.cls = Command  # arguments shown as IMAGE, [MODEL], [FILE]...


def main() -> None:
    """Entry point: known failures become one line on stderr (``MOSHI_DEBUG=1`` shows the traceback)."""
    # torch makes its compile cache folder when it loads, even where it compiles nothing (on CPU):
    # in moshi's cache folder, not as an empty torchinductor_<user> in $TMPDIR. The engine's
    # processes inherit it.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(settings.cache_dir() / "torchinductor"))
    try:
        app()
    except (EngineError, AudioError) as exc:
        if env_flag("MOSHI_DEBUG"):
            raise
        print(f"moshi: error: {exc}", file=sys.stderr)
        sys.exit(1)
    except ArgumentError as exc:
        if env_flag("MOSHI_DEBUG"):
            raise
        print(f"moshi: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
