"""--base_model as a Hub GGUF (pubmedqa/gguf/source.py) against a fake Hugging Face Hub: a stdlib http.server in a
thread that answers what huggingface_hub asks (model info, and HEAD/GET of ``<repo>/resolve/main/<file>`` with the
ETag, X-Repo-Commit and Content-Length it requires) and records every request. huggingface_hub reads HF_ENDPOINT and
HF_HOME once, at import, so the in-process tests point its ``constants`` at the fake Hub and a temporary cache; one
test runs a fresh interpreter with the real environment variables instead. No model is loaded."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

from pubmedqa.gguf.source import (
    HubGguf,
    ResolvedGguf,
    UnknownCheckpointError,
    is_gguf_base,
    parse_hub_gguf,
    resolve_gguf,
    transformers_checkpoint,
)
from pubmedqa.model_loading import ModelLoadError

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOKEN = "hf_fakeTokenThatMustNeverBeShown123"
OWNER = "someone/Tiny-Model-GGUF"


def write_gguf(path: Path, name: str = "Tiny Model", **metadata: str) -> bytes:
    """A tiny GGUF file (one tensor, no loadable model) with ``general.*`` keys: ``base_models`` is a list of repo
    URLs for general.base_model.N.repo_url, any other keyword a general.<key> string (dots as '__')."""
    import gguf
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(name)
    bases = metadata.pop("base_models", None) or []
    if bases:
        writer.add_base_model_count(len(bases))
        for i, url in enumerate(bases):
            writer.add_base_model_repo_url(i, url)
            writer.add_base_model_name(i, url.rstrip("/").split("/")[-1])
    for key, value in metadata.items():
        writer.add_string(f"general.{key.replace('__', '.')}", value)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path.read_bytes()


@dataclass
class Repo:
    files: dict[str, bytes]
    card_base: str | list[str] | None = None
    status: int = 200  # what every request to the repo gets: 401 or 404 to refuse it


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None


@dataclass
class FakeHub:
    repos: dict[str, Repo] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)
    url: str = ""

    def seen(self) -> list[Seen]:
        """The requests about repos, leaving out huggingface_hub's own housekeeping (it fetches /api/agent-harnesses
        once a day to name the calling agent in its user agent)."""
        return [r for r in self.requests if r.path.startswith("/api/models/") or "/resolve/" in r.path]

    def downloads(self) -> list[str]:
        """The files fetched (GET of resolve/), by path in the repo."""
        return [r.path.split("/resolve/main/", 1)[1] for r in self.seen() if r.method == "GET" and "/resolve/" in r.path]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def do_GET(self) -> None:
            self._answer(body=True)

        def _answer(self, body: bool) -> None:
            path = unquote(urlsplit(self.path).path)
            hub.requests.append(Seen(self.command, path, self.headers.get("Authorization")))
            if path.startswith("/api/models/"):
                repo_id = "/".join(path.removeprefix("/api/models/").split("/")[:2])
                return self._model_info(repo_id, body)
            parts = path.lstrip("/").split("/", 4)
            if len(parts) == 5 and parts[2] == "resolve":
                return self._file("/".join(parts[:2]), parts[4], body)
            self._error(404, "EntryNotFound", "no such route", body)

        def _model_info(self, repo_id: str, body: bool) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None or repo.status != 200:
                return self._refuse(repo, body)
            info = {"id": repo_id, "sha": COMMIT, "siblings": [{"rfilename": name} for name in repo.files]}
            if repo.card_base is not None:
                info["cardData"] = {"base_model": repo.card_base}
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body)

        def _file(self, repo_id: str, name: str, body: bool) -> None:
            repo = hub.repos.get(repo_id)
            if repo is None or repo.status != 200:
                return self._refuse(repo, body)
            if name not in repo.files:
                return self._error(404, "EntryNotFound", f"{name} does not exist", body)
            data = repo.files[name]
            # What hf_hub_download requires of a HEAD: the commit, an ETag (the blob's name in the cache), the size.
            headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": COMMIT,
                       "Content-Type": "application/octet-stream"}
            self._send(200, data, headers, body)

        def _refuse(self, repo: Repo | None, body: bool) -> None:
            status = repo.status if repo is not None else 404
            # A careless server that echoes the credentials: the client's error text must still not show them.
            echo = f"Invalid credentials: {self.headers.get('Authorization')}"
            self._error(status, "RepoNotFound" if status in (401, 404) else "", echo, body)

        def _error(self, status: int, code: str, message: str, body: bool) -> None:
            headers = {"X-Error-Message": message, "Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers, body)

        def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Iterator[FakeHub]:
    """The fake Hub, with huggingface_hub pointed at it, a fresh cache in tmp_path, online, and no token."""
    from huggingface_hub import constants

    fake = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    point_hub_at(monkeypatch, fake.url)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf" / "token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest sets HF_HUB_OFFLINE=1 for the rest of the suite
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()


def point_hub_at(monkeypatch, url: str) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def tiny_repo(hub, tmp_path) -> Repo:
    """A GGUF repo as quantisers publish them: one file per quantisation, a projector, a README."""
    files = {
        "Tiny-Model-Q4_K_M.gguf": write_gguf(tmp_path / "src" / "q4km.gguf", base_models=["https://huggingface.co/org/Tiny-Base"]),
        "Tiny-Model-Q4_K_S.gguf": write_gguf(tmp_path / "src" / "q4ks.gguf"),
        "Tiny-Model-Q8_0.gguf": write_gguf(tmp_path / "src" / "q8.gguf"),
        "mmproj-Tiny-Model-f16.gguf": b"projector",
        "README.md": b"# Tiny Model GGUF\n",
    }
    hub.repos[OWNER] = repo = Repo(files, card_base="org/Tiny-Model")
    return repo


# --- Parsing: no network ---------------------------------------------------------------------------------------------

def test_the_syntax_names_a_hub_gguf_and_nothing_else(tmp_path):
    assert parse_hub_gguf("bartowski/Qwen2.5-1.5B-Instruct-GGUF:Q4_K_M") == HubGguf(
        "bartowski/Qwen2.5-1.5B-Instruct-GGUF", quant="Q4_K_M")
    assert parse_hub_gguf("owner/repo:sub/file.gguf") == HubGguf("owner/repo", filename="sub/file.gguf")
    assert parse_hub_gguf("owner/repo/sub/file.GGUF") == HubGguf("owner/repo", filename="sub/file.GGUF")
    assert parse_hub_gguf("hf.co/owner/repo:Q8_0") == parse_hub_gguf("https://huggingface.co/owner/repo:Q8_0") == HubGguf(
        "owner/repo", quant="Q8_0")
    local = tmp_path / "a" / "b" / "model.gguf"
    local.parent.mkdir(parents=True)
    local.write_bytes(b"GGUF")
    for other in ("embedded", "meta-llama/Llama-2-13b-chat-hf", "./models/x:Q4", "/abs/owner/repo/file.gguf",
                  "model.gguf", "~/x/y/z.gguf", str(local), "owner:Q4_K_M"):
        assert parse_hub_gguf(other) is None, other
    assert all(is_gguf_base(v) for v in ("embedded", "x.gguf", "owner/repo:Q4_K_M", "owner/repo/f.gguf", str(local)))
    assert not any(is_gguf_base(v) for v in ("meta-llama/Llama-2-13b-chat-hf", str(tmp_path)))


def test_a_missing_local_file_is_one_clear_line(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a GGUF file.*owner/repo:QUANT"):
        resolve_gguf(str(tmp_path / "missing.gguf"))
    local = tmp_path / "model.gguf"
    local.write_bytes(b"GGUF")
    assert resolve_gguf(str(local)) == ResolvedGguf(local)


def test_the_engine_choice_delegates_to_the_same_test(monkeypatch, tiny_model_dir):
    from pubmedqa.config import ModelSettings
    from pubmedqa.engines import factory

    monkeypatch.setattr(factory, "llama_cpp_available", lambda: True)  # no llama.cpp import in this file
    spec = "owner/repo:Q4_K_M"
    monkeypatch.setattr(factory.torch.cuda, "is_available", lambda: False)
    assert factory.resolve_engine(ModelSettings(base_model=spec, adapter="none")) == ("llama.cpp", None)
    monkeypatch.setattr(factory.torch.cuda, "is_available", lambda: True)
    # On a GPU only the embedded GGUF has a transformers twin; any other GGUF stays on llama.cpp.
    assert factory.resolve_engine(ModelSettings(base_model=spec, adapter="none")) == ("llama.cpp", None)
    assert factory.resolve_engine(ModelSettings(adapter="none"))[0] == "transformers"
    with pytest.raises(ValueError, match="is a GGUF file"):
        factory.resolve_engine(ModelSettings(base_model=spec, adapter="none", engine="transformers"))
    with pytest.raises(ValueError, match="owner/repo:QUANT"):
        factory.resolve_engine(ModelSettings(base_model=str(tiny_model_dir), adapter="none", engine="llama.cpp"))
    monkeypatch.setattr(factory, "llama_cpp_available", lambda: False)
    with pytest.raises(ValueError, match="needs llama-cpp-python"):
        factory.resolve_engine(ModelSettings(base_model=spec, adapter="none"))


# --- Resolution against the fake Hub ------------------------------------------------------------------------------

def test_a_quantisation_name_is_matched_downloaded_and_then_served_from_the_cache(hub, tiny_repo, tmp_path):
    first = resolve_gguf(f"{OWNER}:q4_k_m")  # case-insensitive; Q4_K_S and the projector are not matches
    assert first.path.name == "Tiny-Model-Q4_K_M.gguf" and first.path.read_bytes() == tiny_repo.files[first.path.name]
    assert str(first.path).startswith(str(tmp_path / "hf" / "hub")) and first.repo_id == OWNER
    assert first.card_base_models == ("org/Tiny-Model",)
    assert [(r.method, r.path) for r in hub.seen()] == [
        ("GET", f"/api/models/{OWNER}"),
        ("HEAD", f"/{OWNER}/resolve/main/Tiny-Model-Q4_K_M.gguf"),
        ("GET", f"/{OWNER}/resolve/main/Tiny-Model-Q4_K_M.gguf"),
    ]
    hub.requests.clear()
    assert resolve_gguf(f"{OWNER}:Q4_K_M").path == first.path
    assert hub.downloads() == [] and [r.method for r in hub.seen()] == ["GET", "HEAD"]  # info + freshness check


def test_a_file_is_named_by_path_or_after_the_colon(hub, tiny_repo):
    by_path = resolve_gguf(f"{OWNER}/Tiny-Model-Q8_0.gguf")
    assert by_path.path.name == "Tiny-Model-Q8_0.gguf"
    assert resolve_gguf(f"{OWNER}:Tiny-Model-Q8_0.gguf").path == by_path.path
    assert hub.downloads() == ["Tiny-Model-Q8_0.gguf"]


def test_no_match_or_several_matches_list_the_candidates_and_download_nothing(hub, tiny_repo):
    with pytest.raises(ModelLoadError) as none:
        resolve_gguf(f"{OWNER}:Q5_K_M")
    message = str(none.value)
    assert "no .gguf file matching 'Q5_K_M'" in message and "\n" not in message
    assert "Tiny-Model-Q4_K_M.gguf, Tiny-Model-Q4_K_S.gguf, Tiny-Model-Q8_0.gguf" in message and "mmproj" not in message
    with pytest.raises(ModelLoadError, match="has no file nope.gguf"):
        resolve_gguf(f"{OWNER}/nope.gguf")
    hub.repos["someone/two-GGUF"] = Repo({"a-Q4_K_M.gguf": b"a", "b-Q4_K_M.gguf": b"b"})
    with pytest.raises(ModelLoadError, match=r"matches several files: a-Q4_K_M.gguf, b-Q4_K_M.gguf; name one exactly"):
        resolve_gguf("someone/two-GGUF:Q4_K_M")
    assert hub.downloads() == []


def test_a_split_gguf_is_downloaded_whole(hub):
    parts = {f"Q4_K_M/big-Q4_K_M-0000{i}-of-00003.gguf": bytes([i]) * 10 for i in (1, 2, 3)}
    hub.repos["someone/big-GGUF"] = Repo({**parts, "Q8_0/big-Q8_0.gguf": b"q8"})
    resolved = resolve_gguf("someone/big-GGUF:Q4_K_M")
    assert resolved.path.name == "big-Q4_K_M-00001-of-00003.gguf"
    assert sorted(hub.downloads()) == sorted(parts)
    assert all((resolved.path.parent / Path(p).name).is_file() for p in parts)  # llama.cpp finds them beside part 1


# The Hub answers 401 both for a repo that does not exist and for one the token may not see: the line says both.
@pytest.mark.parametrize("status, expected", [(401, "not found \\(401\\).*check the name.*HF_TOKEN"),
                                              (404, "not found \\(404\\)")])
def test_a_refusal_is_one_line_without_the_token(hub, monkeypatch, status, expected):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.repos["someone/private-GGUF"] = Repo({"p-Q4_K_M.gguf": b"p"}, status=status)
    with pytest.raises(ModelLoadError, match=expected) as refused:
        resolve_gguf("someone/private-GGUF:Q4_K_M")
    assert TOKEN not in str(refused.value) and "\n" not in str(refused.value)
    assert refused.value.__cause__ is None and refused.value.__context__ is not None  # the chain is not printed
    assert hub.seen()[0].authorization == f"Bearer {TOKEN}"  # HF_TOKEN was honoured


def test_offline_or_unreachable_uses_the_cached_copy(hub, tiny_repo, monkeypatch):
    from huggingface_hub import constants

    online = resolve_gguf(f"{OWNER}:Q4_K_M").path
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_gguf(f"{OWNER}:Q4_K_M").path == online
    assert resolve_gguf(f"{OWNER}/Tiny-Model-Q4_K_M.gguf").path == online
    assert hub.seen() == []
    with pytest.raises(ModelLoadError, match="cached copy of the repo has no .gguf file matching 'Q8_0'"):
        resolve_gguf(f"{OWNER}:Q8_0")  # on the Hub, but never downloaded
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    point_hub_at(monkeypatch, "http://127.0.0.1:9")  # nothing listens there: unreachable
    assert resolve_gguf(f"{OWNER}:Q4_K_M").path == online


def test_offline_without_a_cached_copy_is_one_clear_line(hub, tiny_repo, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError) as offline:
        resolve_gguf(f"{OWNER}:Q4_K_M")
    message = str(offline.value)
    assert "is not in the Hugging Face cache" in message and "offline mode" in message and "\n" not in message
    assert hub.seen() == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    hub.repos[OWNER].status = 503  # the Hub is down: as good as unreachable
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    with pytest.raises(ModelLoadError, match="is not in the Hugging Face cache") as down:
        resolve_gguf(f"{OWNER}:Q4_K_M")
    assert TOKEN not in str(down.value)


def test_every_llama_cpp_user_takes_its_file_from_here(hub, tiny_repo):
    from pubmedqa.gguf.source import gguf_file

    path = gguf_file(f"{OWNER}:Q4_K_M")
    assert path.name == "Tiny-Model-Q4_K_M.gguf" and path.is_file()


def test_the_environment_variables_reach_a_fresh_process_and_the_token_is_never_printed(hub, tiny_repo, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING", "TRANSFORMERS_OFFLINE"))}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "home"), HF_TOKEN=TOKEN, HF_HUB_DISABLE_TELEMETRY="1")
    script = ("import logging, sys; logging.basicConfig(level=logging.DEBUG); "
              "from pubmedqa.gguf.source import resolve_gguf; print(resolve_gguf(sys.argv[1]).path)")
    done = subprocess.run([sys.executable, "-c", script, f"{OWNER}:Q4_K_M"], check=False, cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.is_file() and str(path).startswith(str(tmp_path / "home" / "hub"))
    assert TOKEN not in done.stdout + done.stderr
    assert {r.authorization for r in hub.seen()} == {f"Bearer {TOKEN}"}


# --- The trainer's transformers checkpoint ------------------------------------------------------------------------

def test_the_training_base_comes_from_the_flag_without_touching_the_hub(hub, tiny_repo):
    from pubmedqa.config import BaseModelSettings
    from training.gguf_base import training_base

    settings = training_base(BaseModelSettings(base_model=f"{OWNER}:Q4_K_M"), "org/Tiny-Model")
    assert settings.base_model == "org/Tiny-Model" and hub.seen() == []
    assert training_base(BaseModelSettings(), "") == BaseModelSettings()  # the embedded default: as today
    with pytest.raises(ValueError, match="--train_base_model is for a GGUF --base_model"):
        training_base(BaseModelSettings(base_model="org/Tiny-Model"), "org/Other")


def test_the_flag_and_its_variable_reach_the_training_arguments(monkeypatch):
    from pubmedqa.config import BaseModelSettings, parse_settings
    from training.arguments import TrainArguments

    argv = ["--base_model", f"{OWNER}:Q4_K_M", "--train_base_model", "org/Tiny-Model"]
    model, args = parse_settings([BaseModelSettings, TrainArguments], argv)
    assert (model.base_model, args.train_base_model) == (f"{OWNER}:Q4_K_M", "org/Tiny-Model")
    monkeypatch.setenv("PUBMEDQA_TRAIN_BASE_MODEL", "org/From-Env")
    assert parse_settings([BaseModelSettings, TrainArguments], [])[1].train_base_model == "org/From-Env"
    assert TrainArguments().train_base_model == ""


def test_the_training_base_comes_from_the_hub_repo_card_when_it_names_the_same_model(hub, tiny_repo):
    from pubmedqa.config import BaseModelSettings
    from training.gguf_base import training_base

    # The GGUF's own general.base_model.0 is org/Tiny-Base (its parent); the card of Tiny-Model-GGUF names Tiny-Model.
    assert training_base(BaseModelSettings(base_model=f"{OWNER}:Q4_K_M")).base_model == "org/Tiny-Model"


def test_the_training_base_comes_from_the_gguf_metadata(tmp_path):
    converted = tmp_path / "converted.gguf"
    write_gguf(converted, source__repo_url="https://huggingface.co/org/Exact-Source")
    assert transformers_checkpoint(ResolvedGguf(converted)) == "org/Exact-Source"
    legacy = tmp_path / "legacy.gguf"
    write_gguf(legacy, source__huggingface__repository="org/Legacy-Source")
    assert transformers_checkpoint(ResolvedGguf(legacy)) == "org/Legacy-Source"
    same_name = tmp_path / "same.gguf"
    write_gguf(same_name, name="Tiny Model 1B", base_models=["https://huggingface.co/org/Tiny-Model-1B"])
    assert transformers_checkpoint(ResolvedGguf(same_name)) == "org/Tiny-Model-1B"


def test_a_parent_model_or_nothing_is_one_error_naming_the_flag(tmp_path):
    from pubmedqa.config import BaseModelSettings
    from training.gguf_base import training_base

    instruct = tmp_path / "instruct.gguf"
    write_gguf(instruct, name="Tiny Model Instruct", finetune="Instruct", base_models=["https://huggingface.co/org/Tiny-Model"])
    with pytest.raises(UnknownCheckpointError, match="general.base_model.0.repo_url is org/Tiny-Model: a model it was derived from"):
        transformers_checkpoint(ResolvedGguf(instruct))
    bare = tmp_path / "bare.gguf"
    write_gguf(bare)
    for path in (instruct, bare):
        with pytest.raises(ModelLoadError, match="Pass the transformers model .* with --train_base_model") as missing:
            training_base(BaseModelSettings(base_model=str(path)))
        assert "\n" not in str(missing.value)


def test_start_up_checks_a_hub_gguf_without_downloading_it_and_refuses_a_missing_file(hub, tiny_repo, tmp_path):
    from pubmedqa.config import ModelSettings
    from pubmedqa.engines.llama_cpp_engine import LlamaCppEngine

    # The page comes up first; the download is the model's own load's (a wrong local path still fails at once).
    LlamaCppEngine(ModelSettings(base_model=f"{OWNER}:Q4_K_M", adapter="none", engine="llama.cpp")).check_sources()
    assert hub.seen() == []
    missing = LlamaCppEngine(ModelSettings(base_model=str(tmp_path / "nope.gguf"), adapter="none", engine="llama.cpp"))
    with pytest.raises(ModelLoadError, match="is not a GGUF file"):
        missing.check_sources()


def test_a_path_that_may_be_a_mistyped_local_file_says_so(hub):
    # owner/repo/file.gguf is a Hub GGUF only because no such local file exists: a typo of a local path reads alike.
    with pytest.raises(ModelLoadError, match="nor is there a local file models/gguf/base.gguf"):
        resolve_gguf("models/gguf/base.gguf")
