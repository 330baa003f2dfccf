"""Checkpoint resolution: model names, local folders, hf:// links, the HF cache, offline use, Hub failures.

The Hub itself cannot be reached from the test machines. Network behaviour is exercised for real against
loopback endpoints: a closed port, a socket that never answers, and a small HTTP server that answers the
download protocol the way huggingface.co does (same status codes and X-Error-Code / X-Repo-Commit headers).
Everything that depends on HF_* variables runs in a subprocess, since huggingface_hub reads them at import,
as it does for users.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from engine.errors import CheckpointError
from engine.hub import MODELS, CheckpointInfo

ROOT = Path(__file__).resolve().parents[2]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
BF16 = "kyutai/moshika-pytorch-bf16"
Q8 = "kyutai/moshika-pytorch-q8"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
SPM_FILE = "tokenizer_spm_32k_3.model"

# kyutai/stt-1b-en_fr's config.json: the architecture plus the checkpoint keys the loader pops
STT_CONFIG = {
    "dim": 2048, "text_card": 8000, "existing_text_padding_id": 3, "n_q": 32, "dep_q": 0, "card": 2048,
    "num_heads": 16, "num_layers": 16, "hidden_scale": 4.125, "causal": True, "layer_scale": None, "context": 750,
    "max_period": 100000, "gating": "silu", "norm": "rms_norm_f32", "positional_embedding": "rope",
    "delays": [0] * 33, "fuser": None,
    "model_type": "stt",
    "lm_gen_config": {"temp": 0.0, "temp_text": 0.0, "top_k": 250, "top_k_text": 50},
    "stt_config": {"audio_delay_seconds": 0.5, "audio_silence_prefix_seconds": 0.0},
    "mimi_name": "mimi-pytorch-e351c8d8@125.safetensors",
    "tokenizer_name": "tokenizer_en_fr_audio_8000.model",
    "mimi_config_name": "mimi_config.json",
    "model_id": {"sig": "abcd1234", "epoch": 125},
    "tts_config": {},
    "lora_name": None,
}
# A q8 repo's config.json: its own LM file, Mimi and the tokenizer linked from the bf16 repo (hf:// names).
Q8_CONFIG = {
    "dim": 4096, "num_layers": 32, "quantize": True, "moshi_name": "model.q8.safetensors",
    "mimi_name": f"hf://{BF16}/{MIMI_FILE}", "tokenizer_name": f"hf://{BF16}/{SPM_FILE}",
}
Q8_FILES = {"config.json": json.dumps(Q8_CONFIG).encode(), "model.q8.safetensors": b"q8 LM weights"}
BF16_FILES = {"model.safetensors": b"bf16 LM weights", MIMI_FILE: b"Mimi weights", SPM_FILE: b"sentencepiece"}


def write_files(folder: Path, files: dict[str, bytes | str]) -> Path:
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return folder


def cache_repo(cache: Path, repo: str, files: dict[str, bytes], absent: tuple[str, ...] = ()) -> None:
    """Lay out files the way huggingface_hub stores a downloaded snapshot of ``main``."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    write_files(storage / "snapshots" / COMMIT, files)
    write_files(storage / ".no_exist" / COMMIT, {name: b"" for name in absent})
    write_files(storage / "refs", {"main": COMMIT})


def hf_env(tmp_path: Path, endpoint: str, **extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT=endpoint)
    env.update(extra)
    return env


_RESOLVE = """
import json, sys
from pathlib import Path
from engine.errors import EngineError
from engine.hub import CheckpointInfo
try:
    info = CheckpointInfo.resolve(sys.argv[1], **json.loads(sys.argv[2]))
except EngineError as exc:
    sys.exit(f"error: {exc}")
print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in vars(info).items()}))
"""


def resolve_in_process(name: str, env: dict[str, str], **kwargs) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", _RESOLVE, name, json.dumps(kwargs)], env=env, cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def moshi(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", "from moshi_tui.cli import main; main()", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    return done, time.monotonic() - start


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _HubHandler(BaseHTTPRequestHandler):
    """``/{owner}/{name}/resolve/{revision}/{path}`` answered like huggingface.co answers an anonymous client."""

    def do_HEAD(self):
        self._answer(with_body=False)

    def do_GET(self):
        self._answer(with_body=True)

    def _answer(self, with_body: bool):
        match = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", unquote(urlsplit(self.path).path))
        if match is None:  # huggingface_hub's own side requests (telemetry registry)
            return self._send(404)
        repo, revision, filename = match.groups()
        self.server.requests.append((self.command, repo, revision, filename))
        files = self.server.repos.get(repo)
        if repo in self.server.replies:
            status, code = self.server.replies[repo]
            return self._send(status, {"X-Error-Code": code} if code else {})
        if files is None:
            return self._send(401, {"X-Error-Code": "RepoNotFound"})
        if revision not in ("main", COMMIT):
            return self._send(404, {"X-Error-Code": "RevisionNotFound"})
        if filename not in files:
            return self._send(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT})
        data = files[filename]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        self._send(200, headers, data, with_body)

    def _send(self, status: int, headers: dict[str, str] = {}, data: bytes = b"", with_body: bool = False):
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _HubHandler)
    server.repos, server.replies, server.requests = {}, {}, []
    server.url = f"http://127.0.0.1:{server.server_port}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


# --- local folders ---------------------------------------------------------------------------------------------


def test_folder_config_is_split_as_the_reference_splits_it(tmp_path):
    from moshi.models.loaders import CheckpointInfo as Reference

    mimi_config = {"sample_rate": 24000, "frame_rate": 12.5, "seanet": {"dimension": 512}}
    folder = write_files(tmp_path / "stt", {
        "config.json": json.dumps(STT_CONFIG), "mimi_config.json": json.dumps(mimi_config),
        "model.safetensors": b"lm", STT_CONFIG["mimi_name"]: b"mimi", STT_CONFIG["tokenizer_name"]: b"spm",
    })
    ours = CheckpointInfo.resolve(str(folder))
    ref = Reference.from_hf_repo(
        "unused/offline", moshi_weights=folder / "model.safetensors", mimi_weights=folder / STT_CONFIG["mimi_name"],
        tokenizer=folder / STT_CONFIG["tokenizer_name"], config_path=folder / "config.json",
        mimi_config_path=folder / "mimi_config.json",
    )
    assert ours.lm_config == ref.lm_config
    assert (ours.model_type, ours.lm_gen_config, ours.stt_config, ours.model_id, ours.mimi_config) == (
        ref.model_type, ref.lm_gen_config, ref.stt_config, ref.model_id, ref.mimi_config)
    assert ours.raw_config == ref.raw_config
    assert (ours.lm_weights, ours.mimi_weights, ours.tokenizer) == (ref.moshi_weights, ref.mimi_weights, ref.tokenizer)
    assert ours.repo == folder and ours.config_path == folder / "config.json"


def test_folder_without_config_falls_back_to_the_reference_moshi_7b(tmp_path, caplog):
    from moshi.models import loaders

    names = (loaders.MOSHI_NAME, loaders.MIMI_NAME, loaders.TEXT_TOKENIZER_NAME)
    folder = write_files(tmp_path / "vis", {name: name.encode() for name in names})
    with caplog.at_level(logging.WARNING, logger="engine.hub"):
        info = CheckpointInfo.resolve(folder)
    assert "no config.json" in caplog.text and str(folder) in caplog.text
    assert info.lm_config == loaders._lm_kwargs
    assert (info.model_type, info.raw_config, info.config_path, info.mimi_config) == ("moshi", None, None, None)
    assert [p.read_bytes().decode() for p in (info.lm_weights, info.mimi_weights, info.tokenizer)] == list(names)


def test_missing_file_in_a_folder_names_the_file_and_the_folder(tmp_path):
    folder = write_files(tmp_path / "stt", {
        "config.json": json.dumps({**STT_CONFIG, "mimi_config_name": None}), "model.safetensors": b"lm",
        STT_CONFIG["mimi_name"]: b"mimi",
    })
    with pytest.raises(CheckpointError) as err:
        CheckpointInfo.resolve(str(folder))
    assert f"{folder} has no tokenizer_en_fr_audio_8000.model (tokenizer_name in config.json)" == str(err.value)


def test_explicit_paths_and_file_links_replace_the_folder_files(tmp_path):
    elsewhere = write_files(tmp_path / "elsewhere", {
        "lm.safetensors": b"my lm", "mimi.safetensors": b"my mimi", "spm.model": b"my spm",
        "other.json": json.dumps({**STT_CONFIG, "mimi_config_name": None}),
    })
    folder = write_files(tmp_path / "model", {"config.json": json.dumps(Q8_CONFIG)})  # none of its files exist

    info = CheckpointInfo.resolve(
        folder, lm_weights=str(elsewhere / "lm.safetensors"), mimi_weights=f"file://{elsewhere}/mimi.safetensors",
        tokenizer=elsewhere / "spm.model",
    )
    assert [p.read_bytes() for p in (info.lm_weights, info.mimi_weights, info.tokenizer)] == [
        b"my lm", b"my mimi", b"my spm"]
    assert info.lm_config["quantize"] is True

    write_files(folder, {"model.safetensors": b"lm", STT_CONFIG["tokenizer_name"]: b"spm",
                         STT_CONFIG["mimi_name"]: b"folder mimi"})
    info = CheckpointInfo.resolve(folder, config=str(elsewhere / "other.json"))
    assert info.model_type == "stt" and info.stt_config == STT_CONFIG["stt_config"]
    assert info.mimi_weights.read_bytes() == b"folder mimi"
    assert info.config_path == elsewhere / "other.json"


def test_missing_explicit_path_is_named(tmp_path):
    folder = write_files(tmp_path / "model", {"config.json": "{}"})
    with pytest.raises(CheckpointError, match=r"nope\.safetensors does not exist \(the LM weights given\)"):
        CheckpointInfo.resolve(folder, lm_weights=str(tmp_path / "nope.safetensors"))


def test_folder_hf_links_are_found_in_a_models_root_laid_out_like_the_hub(tmp_path):
    write_files(tmp_path / "models" / BF16, BF16_FILES)
    folder = write_files(tmp_path / "models" / Q8, Q8_FILES)
    info = CheckpointInfo.resolve(folder)
    assert info.mimi_weights == tmp_path / "models" / BF16 / MIMI_FILE
    assert info.tokenizer.read_bytes() == BF16_FILES[SPM_FILE]
    assert info.lm_weights.read_bytes() == Q8_FILES["model.q8.safetensors"]


@pytest.mark.parametrize("name, message", [
    ("moshika-xl", "unknown model 'moshika-xl'"),
    ("./no/such/folder", "no model folder no/such/folder"),
    ("config.json", "config.json is a file"),
    ("model", "malformed link 'hf://kyutai/only-repo': expected hf://owner/repo/path/in/repo"),
    ("bad-json", "config.json is not valid JSON: Expecting ',' delimiter: line 1 column 40"),
    ("lora", "names LoRA weights (lora.safetensors): not supported"),
])
def test_bad_names_and_configs_give_one_line_errors(tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    # the stt_1b_enfr.json Kyutai publishes with its STT scripts misses a comma before "fuser"
    write_files(tmp_path / "bad-json", {"config.json": '{"delays": [0, 0], "model_type": "stt" "fuser": null}'})
    write_files(tmp_path / "model", {"config.json": json.dumps({"mimi_name": "hf://kyutai/only-repo"}),
                                     "model.safetensors": b"lm"})
    write_files(tmp_path / "lora", {"config.json": json.dumps({"lora_name": "lora.safetensors"})})
    write_files(tmp_path, {"config.json": "{}"})
    with pytest.raises(CheckpointError) as err:
        CheckpointInfo.resolve(name)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_revision_is_refused_for_a_folder(tmp_path):
    with pytest.raises(CheckpointError, match="revision applies to Hugging Face repos"):
        CheckpointInfo.resolve(tmp_path, revision="main")


def test_importing_the_resolver_loads_neither_torch_nor_huggingface_hub():
    code = "import sys, engine.hub; print(sorted({'torch', 'huggingface_hub'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --- the Hugging Face cache, offline -----------------------------------------------------------------------------


def test_offline_named_model_comes_from_the_cache_following_links(tmp_path):
    cache_repo(tmp_path / "hub", Q8, Q8_FILES)
    cache_repo(tmp_path / "hub", BF16, BF16_FILES)
    env = hf_env(tmp_path, f"http://127.0.0.1:{closed_port()}", HF_HUB_OFFLINE="1")
    info = resolve_in_process("moshika-q8", env)
    snapshot = tmp_path / "hub" / "models--kyutai--moshika-pytorch-{}" / "snapshots" / COMMIT
    assert info["lm_weights"] == str(snapshot).format("q8") + "/model.q8.safetensors"
    assert info["mimi_weights"] == str(snapshot).format("bf16") + f"/{MIMI_FILE}"
    assert info["tokenizer"] == str(snapshot).format("bf16") + f"/{SPM_FILE}"
    assert info["repo"] == Q8 and info["lm_config"] == {"dim": 4096, "num_layers": 32, "quantize": True}


def test_offline_missing_file_says_which_and_how_to_get_it(tmp_path):
    cache_repo(tmp_path / "hub", Q8, Q8_FILES)
    cache_repo(tmp_path / "hub", BF16, {MIMI_FILE: b"mimi"})
    env = hf_env(tmp_path, f"http://127.0.0.1:{closed_port()}", HF_HUB_OFFLINE="1")
    done, _ = moshi("download", "moshika-q8", env=env)
    assert done.returncode == 1
    assert done.stderr.startswith(
        f"moshi: error: HF_HUB_OFFLINE is set and {BF16}/{SPM_FILE} (tokenizer_name in config.json of {Q8}) is not "
        f"in the Hugging Face cache ({tmp_path / 'hub'}); copy that folder from a machine where "
        "`moshi download moshika-q8` worked")
    assert done.stderr.count("\n") == 1


def test_offline_legacy_repo_is_known_from_the_cache(tmp_path):
    from moshi.models.loaders import _lm_kwargs

    cache_repo(tmp_path / "hub", "kyutai/moshika-vis-pytorch-bf16", BF16_FILES, absent=("config.json",))
    env = hf_env(tmp_path, f"http://127.0.0.1:{closed_port()}", HF_HUB_OFFLINE="1")
    info = resolve_in_process("moshika-vis", env)
    assert info["lm_config"] == _lm_kwargs and info["model_type"] == "moshi"
    assert Path(info["lm_weights"]).read_bytes() == BF16_FILES["model.safetensors"]


def test_folder_links_come_from_the_cache_offline(tmp_path):
    cache_repo(tmp_path / "hub", BF16, BF16_FILES)
    folder = write_files(tmp_path / "my-q8", Q8_FILES)
    info = resolve_in_process(str(folder), hf_env(tmp_path, f"http://127.0.0.1:{closed_port()}", HF_HUB_OFFLINE="1"))
    assert Path(info["mimi_weights"]).read_bytes() == BF16_FILES[MIMI_FILE]
    assert info["lm_weights"] == str(folder / "model.q8.safetensors")


def test_folder_links_use_the_cache_before_the_network(tmp_path, hub):
    cache_repo(tmp_path / "hub", BF16, BF16_FILES)
    hub.repos[BF16] = {name: b"newer on the Hub" for name in BF16_FILES}
    folder = write_files(tmp_path / "my-q8", Q8_FILES)
    info = resolve_in_process(str(folder), hf_env(tmp_path, hub.url))
    assert Path(info["tokenizer"]).read_bytes() == BF16_FILES[SPM_FILE]
    assert hub.requests == []


def test_folder_link_missing_everywhere_names_file_and_folder(tmp_path):
    folder = write_files(tmp_path / "my-q8", Q8_FILES)
    done, _ = moshi("download", str(folder), env=hf_env(tmp_path, f"http://127.0.0.1:{closed_port()}", HF_HUB_OFFLINE="1"))
    assert f"{BF16}/{MIMI_FILE} (mimi_name in config.json of {folder})" in done.stderr
    assert "moshi download kyutai/moshika-pytorch-bf16" in done.stderr


# --- a Hub that cannot be reached, or refuses ---------------------------------------------------------------------


def test_unreachable_hub_fails_in_seconds_saying_how_to_go_offline(tmp_path):
    endpoint = f"http://127.0.0.1:{closed_port()}"
    done, elapsed = moshi("download", "moshika", env=hf_env(tmp_path, endpoint))
    assert done.returncode == 1 and elapsed < 10
    assert done.stderr.startswith(
        f"moshi: error: cannot reach the Hugging Face Hub at {endpoint} to get {BF16}"
        "/config.json: ConnectError")
    assert "on a connected machine" not in done.stderr  # the command that just failed
    assert ("use a local folder (--hf-repo /path/to/folder), or copy the Hugging Face cache folder "
            f"({tmp_path / 'hub'}) from a machine where `moshi download moshika` worked to the same place here and "
            "set HF_HUB_OFFLINE=1") in done.stderr
    assert done.stderr.count("\n") == 1


def test_silent_hub_times_out_in_seconds(tmp_path):
    with socket.socket() as silent:  # accepts connections (in the kernel backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        env = hf_env(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}", HF_HUB_ETAG_TIMEOUT="1")
        done, elapsed = moshi("download", "stt-2.6b-en", env=env)
    assert done.returncode == 1 and elapsed < 10
    assert "cannot reach the Hugging Face Hub" in done.stderr and "Timeout" in done.stderr


def test_unreachable_hub_still_serves_cached_files(tmp_path):
    cache_repo(tmp_path / "hub", "kyutai/stt-2.6b-en", {
        "config.json": json.dumps({**STT_CONFIG, "mimi_config_name": None}).encode(), "model.safetensors": b"lm",
        STT_CONFIG["mimi_name"]: b"mimi", STT_CONFIG["tokenizer_name"]: b"spm",
    })
    info = resolve_in_process("stt-2.6b-en", hf_env(tmp_path, f"http://127.0.0.1:{closed_port()}"))
    assert info["stt_config"] == STT_CONFIG["stt_config"] and Path(info["tokenizer"]).read_bytes() == b"spm"


@pytest.mark.parametrize("status, code, message", [
    (401, "RepoNotFound", "no model repo kyutai/moshika-pytorch-bf16 on {url} (HTTP 401): check the name"),
    (401, None, "no model repo kyutai/moshika-pytorch-bf16 on {url} (HTTP 401): check the name"),
    (403, "GatedRepo", "access to kyutai/moshika-pytorch-bf16 is refused (HTTP 403): the repo is gated or private"),
    (403, None, "access to kyutai/moshika-pytorch-bf16 is refused (HTTP 403): the repo is gated or private"),
    (404, None, "kyutai/moshika-pytorch-bf16/config.json does not exist (HTTP 404)"),
    (503, None, "the Hugging Face Hub answered HTTP 503 for kyutai/moshika-pytorch-bf16/config.json; try again"),
])
def test_hub_refusals_are_told_apart(tmp_path, hub, status, code, message):
    hub.replies[BF16] = (status, code)
    done, elapsed = moshi("download", "moshika", env=hf_env(tmp_path, hub.url))
    assert done.returncode == 1 and elapsed < 10
    assert done.stderr.startswith(f"moshi: error: {message.format(url=hub.url)}")
    assert done.stderr.count("\n") == 1
    assert len(hub.requests) == 1  # answered at once, without huggingface_hub's retries


def test_file_missing_in_the_repo_is_named(tmp_path, hub):
    hub.repos[BF16] = {"config.json": b"{}", "model.safetensors": b"lm", MIMI_FILE: b"mimi"}
    done, _ = moshi("download", "moshika", env=hf_env(tmp_path, hub.url))
    assert done.stderr.strip() == (
        f"moshi: error: file missing in the repo (HTTP 404): {BF16}/{SPM_FILE} (default tokenizer_name)")


def test_unknown_revision_is_named(tmp_path, hub):
    hub.repos[BF16] = BF16_FILES
    done, _ = moshi("download", "moshika", "--revision", "v9", env=hf_env(tmp_path, hub.url))
    assert done.stderr.strip() == f"moshi: error: {BF16} has no revision 'v9' (HTTP 404)"


# --- moshi download ---------------------------------------------------------------------------------------------


def test_download_fetches_every_file_then_works_offline(tmp_path, hub):
    hub.repos[Q8] = Q8_FILES
    hub.repos[BF16] = BF16_FILES
    done, _ = moshi("download", Q8, "--revision", COMMIT, env=hf_env(tmp_path, hub.url))
    assert done.returncode == 0, done.stderr
    fetched = {(repo, name) for method, repo, _, name in hub.requests if method == "GET"}
    assert fetched == {(Q8, "config.json"), (Q8, "model.q8.safetensors"), (BF16, MIMI_FILE), (BF16, SPM_FILE)}
    printed = dict(re.findall(r"^  ([\w ]+): +(\S+)$", done.stdout, flags=re.M))
    assert Path(printed["LM weights"]).read_bytes() == Q8_FILES["model.q8.safetensors"]
    assert Path(printed["Mimi weights"]).read_bytes() == BF16_FILES[MIMI_FILE]
    assert Path(printed["text tokenizer"]).read_bytes() == BF16_FILES[SPM_FILE]
    assert json.loads(Path(printed["config"]).read_text()) == Q8_CONFIG

    offline = hf_env(tmp_path, f"http://127.0.0.1:{closed_port()}", HF_HUB_OFFLINE="1")
    info = resolve_in_process(Q8, offline, revision=COMMIT)
    assert [info["lm_weights"], info["mimi_weights"], info["tokenizer"]] == [
        printed["LM weights"], printed["Mimi weights"], printed["text tokenizer"]]


def test_download_of_a_legacy_repo_records_that_it_has_no_config(tmp_path, hub):
    hub.repos["kyutai/moshika-vis-pytorch-bf16"] = BF16_FILES
    done, _ = moshi("download", "moshika-vis", env=hf_env(tmp_path, hub.url))
    assert done.returncode == 0, done.stderr
    assert "has no config.json: assuming a Moshi 7B" in done.stderr
    info = resolve_in_process("moshika-vis", hf_env(tmp_path, f"http://127.0.0.1:{closed_port()}", HF_HUB_OFFLINE="1"))
    assert Path(info["mimi_weights"]).read_bytes() == BF16_FILES[MIMI_FILE] and info["raw_config"] is None


@pytest.mark.parametrize("name", ["../../../../etc/passwd", "/etc/passwd", "file:///etc/passwd", "sub/../../x",
                                  "hf://../../etc/passwd", "hf://kyutai/../../../x"])
def test_names_in_config_json_stay_inside_the_folder(tmp_path, name):
    write_files(tmp_path, {"secret": b"not a tokenizer"})
    folder = write_files(tmp_path / "a" / "b" / "model", {
        "config.json": json.dumps({**STT_CONFIG, "mimi_config_name": None, "tokenizer_name": name}),
        "model.safetensors": b"lm", STT_CONFIG["mimi_name"]: b"mimi"})
    with pytest.raises(CheckpointError, match="tokenizer_name|malformed link"):
        CheckpointInfo.resolve(folder)


# --- repos in Kyutai's other formats (no config.json) --------------------------------------------------------------

CANDLE_Q8 = "kyutai/moshiko-candle-q8"
CANDLE_FILES = {"model.q8.gguf": b"GGUF q8", MIMI_FILE: b"Mimi weights", SPM_FILE: b"sentencepiece"}


def test_folder_without_config_finds_the_lm_file_of_its_format(tmp_path):
    folder = write_files(tmp_path / "candle", CANDLE_FILES)
    info = CheckpointInfo.resolve(folder)
    assert (info.lm_weights, info.mimi_weights, info.tokenizer) == (
        folder / "model.q8.gguf", folder / MIMI_FILE, folder / SPM_FILE)
    assert info.raw_config is None
    write_files(folder, {"model.safetensors": b"an official (or candle bf16) LM"})
    assert CheckpointInfo.resolve(folder).lm_weights == folder / "model.safetensors"


def test_other_format_names_are_known():
    for voice in ("moshika", "moshiko"):
        assert MODELS[f"{voice}-candle-q8"] == f"kyutai/{voice}-candle-q8"
        for fmt in ("candle-bf16", "mlx-q4", "mlx-q8", "mlx-bf16"):
            assert MODELS[f"{voice}-{fmt}"] == f"kyutai/{voice}-{fmt}"


def test_offline_candle_repo_comes_from_the_cache(tmp_path):
    cache_repo(tmp_path / "hub", CANDLE_Q8, CANDLE_FILES, absent=("config.json",))
    env = hf_env(tmp_path, f"http://127.0.0.1:{closed_port()}", HF_HUB_OFFLINE="1")
    info = resolve_in_process("moshiko-candle-q8", env)
    snapshot = tmp_path / "hub" / "models--kyutai--moshiko-candle-q8" / "snapshots" / COMMIT
    assert info["lm_weights"] == f"{snapshot}/model.q8.gguf"
    assert info["raw_config"] is None


def test_online_candle_repo_downloads_the_lm_file_it_has(tmp_path, hub):
    hub.repos[CANDLE_Q8] = CANDLE_FILES
    info = resolve_in_process("moshiko-candle-q8", hf_env(tmp_path, hub.url))
    assert Path(info["lm_weights"]).name == "model.q8.gguf" and Path(info["lm_weights"]).read_bytes() == b"GGUF q8"
    # The official name is asked first; the Hub's 404 sends the resolver on to the GGUF.
    asked = [filename for _, repo, _, filename in hub.requests if repo == CANDLE_Q8]
    assert asked.index("model.safetensors") < asked.index("model.q8.gguf")
