"""`moshi models`: the models moshi knows by name, which are in the Hugging Face cache, and their size."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from engine.hub import MODELS  # a plain table: engine.hub imports huggingface_hub only when it fetches

EPILOG = """\
Examples:

\b
  moshi models                        # every name, cached or not, with its size on disk
  moshi models --delete moshika-vis   # free the disk space of one model
  moshi models --delete moshika --yes # without asking
"""


def register(app: typer.Typer) -> None:
    app.command(short_help="List the models and the disk space they take; delete one.", epilog=EPILOG)(models)


def models(
    delete: Annotated[Optional[str], typer.Option(
        "--delete", metavar="MODEL", show_default=False,
        help="Remove this model (a name below, or a Hugging Face repo id) from the Hugging Face cache.")] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
) -> None:
    """List the models moshi knows by name, with their Hugging Face repo and, where they are in the
    Hugging Face cache, the disk space they take.

    The -q8 models take Mimi and the text tokenizer from the bf16 repo of the same voice: deleting
    moshika leaves moshika-q8 unable to run until `moshi download moshika-q8` fetches them again.
    """
    from huggingface_hub import constants, scan_cache_dir

    cache = scan_cache_dir()
    cached = {repo.repo_id: repo for repo in cache.repos if repo.repo_type == "model"}
    if delete is not None:
        _delete(cache, cached.get(MODELS.get(delete, delete)), MODELS.get(delete, delete), yes)
        return
    typer.echo(f"Hugging Face cache: {constants.HF_HUB_CACHE}")
    width = max(map(len, MODELS))
    for name, repo_id in MODELS.items():
        repo = cached.get(repo_id)
        size = repo.size_on_disk_str if repo is not None else "not cached"
        typer.echo(f"  {name:<{width}}  {size:>10}  {repo_id}")
    others = sorted(set(cached) - set(MODELS.values()))
    if others:
        typer.echo("Other cached repos: " + ", ".join(f"{r} ({cached[r].size_on_disk_str})" for r in others))


def _delete(cache, repo, repo_id: str, yes: bool) -> None:
    """``cache``: huggingface_hub's HFCacheInfo; ``repo``: its CachedRepoInfo of ``repo_id``, None if absent."""
    from engine.errors import EngineError

    if repo is None:
        raise EngineError(f"{repo_id} is not in the Hugging Face cache; `moshi models` lists what is")
    if not yes and not typer.confirm(f"Delete {repo_id} ({repo.size_on_disk_str}) from {repo.repo_path}?"):
        raise typer.Exit(1)
    cache.delete_revisions(*(revision.commit_hash for revision in repo.revisions)).execute()
    typer.echo(f"Deleted {repo_id}: {repo.size_on_disk_str} freed")
