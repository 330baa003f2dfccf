"""``moshi download``: fetch a model's files into the Hugging Face cache, e.g. before going offline."""

from __future__ import annotations

from typing import Optional

import typer

from engine.hub import MODELS  # a plain table: engine.hub imports huggingface_hub only when it fetches


def download(
    model: str = typer.Argument(
        "moshika", metavar="MODEL",
        help=f"A model name ({', '.join(MODELS)}), a Hugging Face repo id (owner/name) or a local folder.",
        show_default=True,
    ),
    revision: Optional[str] = typer.Option(None, "--revision", metavar="REVISION",
                                           help="Branch, tag or commit of the Hugging Face repo."),
) -> None:
    """Download a model's files into the Hugging Face cache, for use offline.

    Fetches config.json, then every file it names, following links to other repos (the q8 models take Mimi and
    the text tokenizer from the bf16 ones). Afterwards HF_HUB_OFFLINE=1 runs the model without the network.
    """
    from engine.hub import CheckpointInfo

    info = CheckpointInfo.resolve(model, revision=revision)
    files = {
        "config": info.config_path,
        "LM weights": info.lm_weights,
        "Mimi weights": info.mimi_weights,
        "text tokenizer": info.tokenizer,
    }
    typer.echo(f"{model} ({info.repo}) is ready:")
    for role, path in files.items():
        typer.echo(f"  {role + ':':16}{path if path is not None else '(none: legacy repo, built-in Moshi 7B config)'}")
    if isinstance(info.repo, str):
        typer.echo("They are in the Hugging Face cache: with HF_HUB_OFFLINE=1 they are used without the network.")
