"""`moshi tiny-model`: write a tiny random checkpoint folder, to try the app without downloading a model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from engine.options import Mode

from ..errors import ArgumentError

EPILOG = """\
Examples:

\b
  moshi tiny-model ./tiny && moshi chat --hf-repo ./tiny --input me.wav -o noise.wav
  moshi tiny-model ./tiny-stt --kind transcribe
  moshi transcribe --hf-repo ./tiny-stt talk.wav
  moshi tiny-model ./tiny-vis --kind see && moshi see --hf-repo ./tiny-vis photo.jpg -i me.wav
"""


def register(app: typer.Typer) -> None:
    app.command("tiny-model", short_help="Write a tiny random model folder for offline tries.", epilog=EPILOG)(
        tiny_model)


def tiny_model(
    folder: Annotated[Path, typer.Argument(metavar="FOLDER", help="Where to write the checkpoint folder.")],
    kind: Annotated[Mode, typer.Option(
        "--kind", help="A model for `moshi chat` (Moshi), `moshi see` (MoshiVis) or `moshi transcribe` (STT).")] = Mode.CHAT,
    seed: Annotated[int, typer.Option("--seed", metavar="N", help="Seed of the random weights.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Write into a folder that already holds files, "
                                        "replacing the checkpoint's.")] = False,
) -> None:
    """Write a tiny checkpoint folder in the official layout, with random weights.

    It loads through the same code as the real models, but it has learnt nothing: it produces
    noise and gibberish, not speech. Use it to try the app and its pipeline offline.
    """
    from engine.tiny import write_tiny_checkpoint

    _check_folder(folder, force)
    path = write_tiny_checkpoint(folder, kind, seed)
    typer.echo(f"wrote a tiny random {kind.value} model to {path} (it speaks noise, not words)")


def _check_folder(folder: Path, force: bool) -> None:
    """A new folder, an empty one, or with --force one that holds files; nothing else."""
    if folder.is_symlink() and not folder.exists():
        raise ArgumentError(f"{folder} is a symlink to nothing")
    if folder.exists() and not folder.is_dir():
        raise ArgumentError(f"{folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not force:
        raise ArgumentError(f"{folder} already holds files; add --force to write the checkpoint's over them")
