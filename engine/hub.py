"""Where a model's files are: from what the user names to local file paths plus the raw ``config.json``.

The user names a short model name (``moshika``), a Hugging Face repo id (``kyutai/stt-2.6b-en``) or a local
folder; explicit paths may replace any file. Names inside ``config.json`` follow the reference's scheme
(``moshi.models.loaders.hf_get``): ``hf://owner/repo/path`` is a file of that repo, ``file://path`` a local
path, and a plain name a file of the current repo or folder. Nothing here builds a model or imports torch;
``huggingface_hub`` is imported only when a file has to come from the Hub.

Offline use is a first-class case: a dead network must fail in seconds with a message that says how to run
without it, and a local folder that links Mimi through ``hf://`` still works when the file is in the HF cache.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CheckpointError
from .formats import transformers

logger = logging.getLogger(__name__)

MODELS = {
    "moshika": "kyutai/moshika-pytorch-bf16",
    "moshiko": "kyutai/moshiko-pytorch-bf16",
    "moshika-q8": "kyutai/moshika-pytorch-q8",
    "moshiko-q8": "kyutai/moshiko-pytorch-q8",
    "moshika-vis": "kyutai/moshika-vis-pytorch-bf16",
    "stt-1b-en_fr": "kyutai/stt-1b-en_fr",
    # the -candle repo is the same model plus the four semantic VAD heads
    "stt-1b-en_fr-vad": "kyutai/stt-1b-en_fr-candle",
    "stt-2.6b-en": "kyutai/stt-2.6b-en",
    # Kyutai's other formats of Moshi 7B, without config.json (engine/formats reads them)
    **{f"{voice}-{fmt}": f"kyutai/{voice}-{fmt}" for voice in ("moshika", "moshiko")
       for fmt in ("candle-q8", "candle-bf16", "mlx-q4", "mlx-q8", "mlx-bf16")},
}

# Repos without config.json (MoshiVis) are Moshi 7B checkpoints with these file names and LM settings
# (the reference's `moshi.models.loaders._lm_kwargs`). The settings are the one definition of Moshi 7B:
# `LMConfig.moshi_7b()` reads them, and so does `LMConfig.from_dict` for keys a config.json leaves out.
LEGACY_LM_WEIGHTS = "model.safetensors"
LEGACY_MIMI_WEIGHTS = "tokenizer-e351c8d8-checkpoint125.safetensors"
LEGACY_TOKENIZER = "tokenizer_spm_32k_3.model"
MOSHI_7B_LM_CONFIG = {
    "dim": 4096,
    "text_card": 32000,
    "existing_text_padding_id": 3,
    "n_q": 16,
    "dep_q": 8,
    "card": 2048,
    "num_heads": 32,
    "num_layers": 32,
    "hidden_scale": 4.125,
    "causal": True,
    "layer_scale": None,
    "context": 3000,
    "max_period": 10000,
    "gating": "silu",
    "norm": "rms_norm_f32",
    "positional_embedding": "rope",
    "depformer_dim": 1024,
    "depformer_dim_feedforward": 4224,
    "depformer_num_heads": 16,
    "depformer_num_layers": 6,
    "depformer_layer_scale": None,
    "depformer_multi_linear": True,
    "depformer_context": 8,
    "depformer_max_period": 10000,
    "depformer_gating": "silu",
    "depformer_pos_emb": "none",
    "depformer_weights_per_step": True,
    "delays": [0, 0, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1, 1],
}

# config.json keys that describe the checkpoint rather than the LM; everything else is LM config.
_FILE_KEYS = {"moshi_name": LEGACY_LM_WEIGHTS, "mimi_name": LEGACY_MIMI_WEIGHTS, "tokenizer_name": LEGACY_TOKENIZER}
_ROLES = {"moshi_name": "LM weights", "mimi_name": "Mimi weights", "tokenizer_name": "text tokenizer"}
_META_KEYS = ("mimi_config_name", "lora_name", "model_type", "lm_gen_config", "tts_config", "stt_config", "model_id")

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Enough for a TCP+TLS handshake and a HEAD answer on a slow link; only the metadata requests use it, so a
# dead network fails fast while the download itself keeps huggingface_hub's own per-read timeout.
_METADATA_TIMEOUT_S = 5.0
_ABSENT = "known to be absent"  # the HF cache records that the repo has no such file


@dataclass
class CheckpointInfo:
    """Local paths of a model's files and its configuration, split as the reference splits config.json."""

    repo: str | Path  # a Hugging Face repo id, or the local folder
    lm_weights: Path
    mimi_weights: Path
    tokenizer: Path
    lm_config: dict
    model_type: str = "moshi"
    lm_gen_config: dict = field(default_factory=dict)
    stt_config: dict = field(default_factory=dict)
    model_id: dict = field(default_factory=dict)
    mimi_config: dict | None = None
    raw_config: dict | None = None  # config.json as read; None for a legacy repo
    config_path: Path | None = None
    revision: str | None = None

    @classmethod
    def resolve(
        cls,
        name_or_path: str | Path,
        *,
        lm_weights: str | Path | None = None,
        mimi_weights: str | Path | None = None,
        tokenizer: str | Path | None = None,
        config: str | Path | None = None,
        revision: str | None = None,
    ) -> CheckpointInfo:
        """Find every file of a model, downloading from the Hub what is not local.

        ``name_or_path`` is a name from ``MODELS``, a repo id or a folder. The overrides are local paths unless
        prefixed ``hf://``; with one given, the corresponding file of the repo is not fetched.
        """
        source = _open_source(name_or_path, revision)
        config_path = source.override(config, "config") if config is not None else source.optional("config.json")
        raw = None if config_path is None else _read_json(config_path, "config")
        if raw is not None and transformers.is_transformers_config(raw):
            return cls._transformers(source, raw, config_path, revision, lm_weights, mimi_weights, tokenizer)
        if raw is None:
            logger.warning(
                "%s has no config.json: assuming a Moshi 7B with the legacy file names, as the reference does "
                "(a candle or MLX LM file takes its sizes from its weights).",
                source.describe(),
            )
        lm_config = dict(MOSHI_7B_LM_CONFIG if raw is None else raw)
        names = {key: lm_config.pop(key, default) for key, default in _FILE_KEYS.items()}
        if raw is None and lm_weights is None:
            names["moshi_name"] = source.first_present(_lm_file_names())
        meta = {key: lm_config.pop(key, None) for key in _META_KEYS}
        if meta["lora_name"]:
            raise CheckpointError(f"{source.describe()} names LoRA weights ({meta['lora_name']}): not supported")

        def file(override: str | Path | None, key: str) -> Path:
            if override is not None:
                return source.override(override, _ROLES[key])
            return source.resolve(names[key], f"{key} in config.json" if raw and key in raw else f"default {key}")

        mimi_config = None
        if meta["mimi_config_name"]:
            mimi_config_path = source.resolve(meta["mimi_config_name"], "mimi_config_name in config.json")
            mimi_config = _read_json(mimi_config_path, "Mimi config")
            if transformers.is_transformers_config(mimi_config):  # kyutai/mimi's config.json
                mimi_config = transformers.mimi_config(mimi_config, str(mimi_config_path))
        return cls(
            repo=source.repo,
            lm_weights=file(lm_weights, "moshi_name"),
            mimi_weights=file(mimi_weights, "mimi_name"),
            tokenizer=file(tokenizer, "tokenizer_name"),
            lm_config=lm_config,
            model_type=meta["model_type"] or "moshi",
            lm_gen_config=meta["lm_gen_config"] or {},
            stt_config=meta["stt_config"] or {},
            model_id=meta["model_id"] or {},
            mimi_config=mimi_config,
            raw_config=raw,
            config_path=config_path,
            revision=revision,
        )

    @classmethod
    def _transformers(cls, source: _Source, raw: dict, config_path: Path, revision: str | None,
                      *overrides: str | Path | None) -> CheckpointInfo:
        """A checkpoint saved by Hugging Face transformers: its config.json mapped to ours."""
        def find(name: str, optional: bool) -> Path | None:
            return source.optional(name) if optional else source.resolve(name, "a transformers checkpoint")

        found = transformers.resolve(raw, source.describe(), find)
        for key, role, value in zip(("lm_weights", "mimi_weights", "tokenizer"), _ROLES.values(), overrides):
            if value is not None:
                found[key] = source.override(value, role)
        return cls(repo=source.repo, raw_config=raw, config_path=config_path, revision=revision, **found)


def _lm_file_names() -> list[str]:
    """The LM file names a repo without config.json may ship, the official one first."""
    from .formats import FORMATS

    names = [LEGACY_LM_WEIGHTS] + [name for fmt in FORMATS for name in fmt.lm_files]
    return list(dict.fromkeys(names))


def check_model_name(name: str) -> None:
    """Raise CheckpointError unless ``name`` is a known model, a model folder or a repo id (nothing is fetched)."""
    _open_source(name, None)


def _open_source(name_or_path: str | Path, revision: str | None) -> _Source:
    if isinstance(name_or_path, str) and name_or_path in MODELS:
        return _HubRepo(MODELS[name_or_path], revision, hint=name_or_path)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if revision is not None:
            raise CheckpointError(f"a revision applies to Hugging Face repos, not to the local folder {path}")
        return _Folder(path.resolve())
    text = str(name_or_path)
    if path.exists():
        raise CheckpointError(f"{text} is a file; give a model name, a Hugging Face repo id or a model folder")
    if text.startswith(("/", ".", "~")) or isinstance(name_or_path, Path):
        raise CheckpointError(f"no model folder {path}")
    if isinstance(name_or_path, str) and _REPO_ID.fullmatch(text):
        return _HubRepo(text, revision, hint=text)
    raise CheckpointError(
        f"unknown model {text!r}: not a folder, a Hugging Face repo id (owner/name) or one of {', '.join(MODELS)}"
    )


class _Source:
    """Where the names in config.json are looked up: a Hugging Face repo or a local folder.

    Subclasses say where a plain name (``_plain``) and an hf:// link (``_link``) are found.
    """

    repo: str | Path

    def resolve(self, name: str, named_by: str) -> Path:
        """A file name from config.json (or its default): a file of this repo or folder, or an
        hf:// link. Nothing a checkpoint names may reach outside them: not a ``file://`` path, not
        an absolute path, not a ``..``."""
        target = _parse_name(name)
        if isinstance(target, tuple):
            return self._link(*target, named_by)
        if target is not None:
            raise CheckpointError(f"{named_by} names {name!r}: a checkpoint's files must be in its folder or "
                                  "hf:// links")
        _check_relative(name, named_by)
        return self._plain(name, named_by)

    def override(self, value: str | Path, role: str) -> Path:
        """A file the user gave explicitly: a local path unless it is an hf:// link."""
        target = _parse_name(value) if isinstance(value, str) else None
        if isinstance(target, tuple):
            return self._link(*target, f"the {role} given")
        return _existing(target or Path(value).expanduser(), f"the {role} given")


class _Folder(_Source):
    """A local model folder: plain names are files in it; only an hf:// link may reach the Hub."""

    def __init__(self, folder: Path):
        self.repo = folder
        self.hub = _Hub(hint=None)

    def describe(self) -> str:
        return f"the folder {self.repo}"

    def optional(self, name: str) -> Path | None:
        path = self.repo / name
        return path if path.is_file() else None

    def first_present(self, names: list[str]) -> str:
        """The first of these files the folder has (the first name if it has none)."""
        return next((name for name in names if (self.repo / name).is_file()), names[0])

    def _plain(self, name: str, named_by: str) -> Path:
        path = self.repo / name
        if not path.is_file():
            raise CheckpointError(f"{self.repo} has no {name} ({named_by})")
        return path

    def _link(self, repo: str, filename: str, named_by: str) -> Path:
        # First beside the folder, in a models root laid out like the Hub (<root>/kyutai/X/file, or a sibling
        # folder named X), then the HF cache, and only then the network.
        owner, name = repo.split("/")
        for candidate in (self.repo.parent.parent / owner / name / filename, self.repo.parent / name / filename):
            if candidate.is_file():
                return candidate
        return self.hub.file(repo, filename, context=f"{named_by} of {self.repo}", prefer_cache=True)


class _HubRepo(_Source):
    """A Hugging Face repo: every file comes through the HF cache."""

    def __init__(self, repo: str, revision: str | None, hint: str):
        self.repo = repo
        self.revision = revision
        self.hub = _Hub(hint)

    def describe(self) -> str:
        return f"the Hugging Face repo {self.repo}"

    def optional(self, name: str) -> Path | None:
        return self.hub.file(self.repo, name, revision=self.revision, optional=True)

    def first_present(self, names: list[str]) -> str:
        """The first of these files the repo has: one in the HF cache if any (no request), else
        the first the Hub has (the first name if it has none)."""
        for name in names:
            if isinstance(_cached(self.repo, name, self.revision), Path):
                return name
        for name in names:
            if self.hub.file(self.repo, name, revision=self.revision, optional=True) is not None:
                return name
        return names[0]

    def _plain(self, name: str, named_by: str) -> Path:
        return self.hub.file(self.repo, name, revision=self.revision, context=named_by)

    def _link(self, repo: str, filename: str, named_by: str) -> Path:
        # The revision names a commit or branch of the user's repo, not of the repo the link points into.
        return self.hub.file(repo, filename, context=f"{named_by} of {self.repo}")


def _parse_name(name: str) -> tuple[str, str] | Path | None:
    """``hf://owner/repo/path`` -> (repo, path); ``file://path`` -> Path; a plain name -> None."""
    if name.startswith("file://"):
        return Path(name.removeprefix("file://")).expanduser()
    if not name.startswith("hf://"):
        return None
    parts = name.removeprefix("hf://").split("/")
    if len(parts) < 3 or not all(parts) or any(part in (".", "..") for part in parts):
        raise CheckpointError(f"malformed link {name!r}: expected hf://owner/repo/path/in/repo")
    return "/".join(parts[:2]), "/".join(parts[2:])


def _check_relative(name: str, named_by: str) -> None:
    """A plain name stays inside its folder or repo: relative, and without ``..``."""
    if not name or os.path.isabs(name) or ".." in re.split(r"[/\\]", name):
        raise CheckpointError(f"{named_by} names {name!r}: a checkpoint's files must be in its folder or "
                              "hf:// links")


def _existing(path: Path, named_by: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist ({named_by})")
    return path


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the {what} {path}: {exc}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"the {what} {path} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"the {what} {path} is not a JSON object")
    return value


class _Hub:
    """Fetches files from the Hugging Face Hub for one ``resolve`` call.

    huggingface_hub retries a failed connection with backoff for about 25 s per file before giving up. Until the
    Hub has answered once, each file is therefore first probed with one metadata request without retries. Once the
    Hub proves unreachable, the rest of the call uses the cache only, so a dead network costs one connection
    attempt, not one per file.
    """

    def __init__(self, hint: str | None):
        from huggingface_hub import constants

        self.offline = constants.HF_HUB_OFFLINE
        self.answered = False  # the Hub answered a request of this call
        self.unreachable: Exception | None = None  # why the Hub gave no answer, once it did not
        self.hint = hint  # the name to suggest to `moshi download`; None: the repo of the missing file

    def file(
        self,
        repo: str,
        filename: str,
        *,
        revision: str | None = None,
        context: str = "",
        prefer_cache: bool = False,
        optional: bool = False,
    ) -> Path | None:
        """Local path of ``repo/filename``. With ``optional``, None when the repo has no such file."""
        where = f"{repo}/{filename}" + (f"@{revision}" if revision else "") + (f" ({context})" if context else "")
        cached = _cached(repo, filename, revision)
        if isinstance(cached, Path) and (prefer_cache or self.offline or self.unreachable):
            return cached
        online = not self.offline and not self.unreachable
        if online and (self.answered or self._answers(repo, filename, revision, where)):
            return self._download(repo, filename, revision, where, optional)
        if isinstance(cached, Path):
            logger.warning("The Hugging Face Hub is unreachable (%s); using the cached %s.", _reason(self.unreachable),
                           where)
            return cached
        if optional and cached == _ABSENT:
            return None
        if self.offline:
            raise CheckpointError(
                f"HF_HUB_OFFLINE is set and {where} is not in the Hugging Face cache ({_cache_dir()}); "
                f"copy that folder from a machine where `moshi download {self.hint or repo}` worked, or use a local "
                "folder (--hf-repo /path/to/folder)"
            )
        raise CheckpointError(
            f"cannot reach the Hugging Face Hub at {_endpoint()} to get {where}: {_reason(self.unreachable)}; "
            + self._offline_howto(repo)
        ) from self.unreachable

    def _answers(self, repo: str, filename: str, revision: str | None, where: str) -> bool:
        """One metadata request without retries: False if nothing answered; an HTTP error becomes a CheckpointError."""
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

        try:
            get_hf_file_metadata(hf_hub_url(repo, filename, revision=revision), timeout=_metadata_timeout())
        except HfHubHTTPError as exc:
            # A missing file goes on to hf_hub_download, which fails at once too but records the absence in the
            # cache, so that an offline run later knows the repo lacks it (a legacy repo without config.json).
            if not isinstance(exc, EntryNotFoundError):
                raise CheckpointError(self._http_error(exc, repo, filename, revision, where)) from exc
        except ValueError as exc:  # huggingface_hub's validation of repo ids and revisions
            raise CheckpointError(f"invalid Hugging Face reference {where}: {exc}") from exc
        except Exception as exc:  # no HTTP answer at all: refused, DNS, timeout, proxy, TLS (types vary by version)
            self.unreachable = exc
            return False
        self.answered = True
        return True

    def _download(self, repo: str, filename: str, revision: str | None, where: str, optional: bool) -> Path | None:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

        try:
            return Path(hf_hub_download(repo, filename, revision=revision, etag_timeout=_metadata_timeout()))
        except HfHubHTTPError as exc:
            if optional and isinstance(exc, EntryNotFoundError):
                return None
            raise CheckpointError(self._http_error(exc, repo, filename, revision, where)) from exc
        except Exception as exc:  # the connection dropped mid-download, the disk is full, ...
            raise CheckpointError(f"downloading {where} failed: {_reason(exc)}") from exc

    def _offline_howto(self, repo: str) -> str:
        return (
            "to run without the network, use a local folder (--hf-repo /path/to/folder), or copy the Hugging Face "
            f"cache folder ({_cache_dir()}) from a machine where `moshi download {self.hint or repo}` worked to the "
            "same place here and set HF_HUB_OFFLINE=1"
        )

    def _http_error(self, exc, repo: str, filename: str, revision: str | None, where: str) -> str:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            GatedRepoError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        status = exc.response.status_code if getattr(exc, "response", None) is not None else "?"
        login = "log in with `hf auth login` (or set HF_TOKEN)"
        if isinstance(exc, GatedRepoError) or status == 403:
            return (
                f"access to {repo} is refused (HTTP {status}): the repo is gated or private; accept its conditions "
                f"at {_endpoint()}/{repo} and {login}"
            )
        if isinstance(exc, RepositoryNotFoundError) or status == 401:
            return f"no model repo {repo} on {_endpoint()} (HTTP {status}): check the name; if it is private, {login}"
        if isinstance(exc, RevisionNotFoundError):
            return f"{repo} has no revision {revision!r} (HTTP {status})"
        if isinstance(exc, EntryNotFoundError):
            return f"file missing in the repo (HTTP {status}): {where}"
        if status == 404:
            return f"{where} does not exist (HTTP 404): check the repo and file names"
        return f"the Hugging Face Hub answered HTTP {status} for {where}; try again later, or " + self._offline_howto(
            repo
        )


def _cached(repo: str, filename: str, revision: str | None) -> Path | str | None:
    """The cached file, ``_ABSENT`` if the cache knows the repo lacks it, or None if the cache cannot tell."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, revision=revision)
    if isinstance(found, str):
        return Path(found)
    return None if found is None else _ABSENT


def _metadata_timeout() -> float:
    # An explicit HF_HUB_ETAG_TIMEOUT wins, as it does inside huggingface_hub.
    return float(os.environ.get("HF_HUB_ETAG_TIMEOUT") or _METADATA_TIMEOUT_S)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _cache_dir() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
