"""Where a GGUF base model comes from when ``--base_model`` names one: a local ``.gguf`` file, or a GGUF file on the
Hugging Face Hub, downloaded once into the ordinary Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``).

A Hub GGUF is written the way llama.cpp's ``-hf`` option writes it, or as the file's path in the repo:

    owner/repo:Q4_K_M           a quantisation name, matched case-insensitively against the repo's .gguf files
    owner/repo:path/file.gguf   one file of the repo (the name after ':' ends in .gguf)
    owner/repo/path/file.gguf   the same, as a path

with an optional ``hf.co/`` (or ``https://huggingface.co/``) in front, as the Hub's "Use this model" snippets write it.

A quantisation name must match exactly one file (or one split GGUF, ``-00001-of-0000N``, whose parts are all
downloaded); zero or several matches is one error that lists the candidates. The token is huggingface_hub's own
(``HF_TOKEN`` or the saved login): it is never logged, and any error text is scrubbed of it. Offline (``HF_HUB_OFFLINE``)
or with the Hub unreachable, the copy in the cache is used; without one, one ``ModelLoadError`` line says so.

:func:`gguf_file` is what every llama.cpp user calls (the engine, the probe's features, the LoRA conversion and the
export): the embedded model's file as well as these. :func:`transformers_checkpoint` names the transformers
checkpoint a GGUF base's LoRA is trained on.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pubmedqa.config import EMBEDDED_MODEL, ModelSettings, env_var
from pubmedqa.embedded_model import embedded_gguf
from pubmedqa.model_loading import ModelLoadError, looks_like_path

logger = logging.getLogger(__name__)

SYNTAX = "owner/repo:QUANT (e.g. bartowski/Qwen2.5-1.5B-Instruct-GGUF:Q4_K_M) or owner/repo/file.gguf"
_REPO = r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*"
_HUB_NAMED = re.compile(rf"^(?P<repo>{_REPO}):(?P<name>[^:]+)$")
_HUB_PATH = re.compile(rf"^(?P<repo>{_REPO})/(?P<file>[^:]+\.gguf)$", re.IGNORECASE)
_SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)  # llama.cpp's gguf-split naming
_HUB_URL = re.compile(rf"^https?://(?:www\.)?huggingface\.co/(?P<repo>{_REPO})/?$")
_HUB_PREFIX = re.compile(r"^(?:https?://)?(?:www\.)?(?:hf\.co|huggingface\.co)/", re.IGNORECASE)
_LISTED = 20  # candidates named in an error message


@dataclass(frozen=True)
class HubGguf:
    """A GGUF file on the Hub: its repo and either the file's path in it or a quantisation name to look for."""

    repo_id: str
    filename: str | None = None
    quant: str | None = None

    def __str__(self) -> str:
        return f"{self.repo_id}:{self.filename or self.quant}"


@dataclass(frozen=True)
class ResolvedGguf:
    """A GGUF base on disk, with what its Hub repo says about it (the trainer's checkpoint comes from these)."""

    path: Path
    repo_id: str | None = None  # the Hub repo it came from; None for a local file
    card_base_models: tuple[str, ...] = ()  # the repo card's base_model entries (unknown offline)


class UnknownCheckpointError(ModelLoadError):
    """A GGUF file does not say which transformers checkpoint its weights are."""


def parse_hub_gguf(value: str) -> HubGguf | None:
    """The Hub GGUF ``value`` names, or None when it names something else (the embedded model, a local path, a
    transformers model). Pure parsing, no network."""
    if value == EMBEDDED_MODEL or looks_like_path(value):  # an existing local path always wins
        return None
    value = _HUB_PREFIX.sub("", value)
    named = _HUB_NAMED.match(value)
    if named:
        name = named["name"]
        if name.lower().endswith(".gguf"):
            return HubGguf(named["repo"], filename=name)
        return HubGguf(named["repo"], quant=name)
    path = _HUB_PATH.match(value)
    return HubGguf(path["repo"], filename=path["file"]) if path else None


def is_gguf_base(value: str) -> bool:
    """Whether ``--base_model`` names a GGUF file (the embedded model, a .gguf path or a Hub GGUF): llama.cpp's."""
    return value == EMBEDDED_MODEL or value.lower().endswith(".gguf") or parse_hub_gguf(value) is not None


def gguf_file(base_model: str, cache_dir: str | Path | None = None) -> Path:
    """The base model's GGUF file: the embedded one (assembled once into ``cache_dir``; by default the app's cache
    folder, ``PUBMEDQA_CACHE_DIR`` honoured, so every command shares one assembled file), a local .gguf, or a Hub
    GGUF from the Hugging Face cache, downloaded there first if need be."""
    if base_model == EMBEDDED_MODEL:
        return embedded_gguf(cache_dir or os.environ.get(env_var(ModelSettings, "cache_dir")) or ModelSettings().cache_dir)
    return resolve_gguf(base_model).path


def check_gguf(value: str) -> HubGguf | Path:
    """What ``value`` (not 'embedded') names, checked without the network: a Hub GGUF, or a local file that exists.
    Start-up calls this, so a wrong setting fails at once while a download waits for the model's own load."""
    hub = parse_hub_gguf(value)
    if hub is not None:
        return hub
    path = Path(value).expanduser()
    if not path.is_file():
        raise ModelLoadError(
            f"{value} is not a GGUF file: set --base_model to '{EMBEDDED_MODEL}', a .gguf path or a Hub GGUF, {SYNTAX}"
        )
    return path


def resolve_gguf(value: str) -> ResolvedGguf:
    """The GGUF file ``value`` (not 'embedded') names: a local file as it is, a Hub GGUF from the cache or downloaded."""
    source = check_gguf(value)
    return _resolve_hub(source) if isinstance(source, HubGguf) else ResolvedGguf(source)


def _resolve_hub(hub: HubGguf) -> ResolvedGguf:
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        # One request gives both the file list and the repo card's base_model (the trainer's checkpoint).
        info = HfApi().model_info(hub.repo_id)
    except _unreachable_errors() as exc:
        return _from_cache(hub, _one_line(exc))
    except HfHubHTTPError as exc:
        if _status(exc) >= 500:  # the Hub is down: as good as unreachable
            return _from_cache(hub, _one_line(exc))
        raise _hub_error(hub, exc) from None  # `from None`: the chained error's text may hold the server's echo
    names = _pick(hub, [sibling.rfilename for sibling in info.siblings or []], "the repo")
    card_base = getattr(info.card_data, "base_model", None) if info.card_data is not None else None
    paths = []
    for name in names:
        logger.info("Base model %s: %s from the Hugging Face Hub (or its cache, when already there)", hub, name)
        try:
            paths.append(Path(hf_hub_download(hub.repo_id, name)))
        except HfHubHTTPError as exc:
            raise _hub_error(hub, exc) from None
        except (OSError, *_unreachable_errors()) as exc:  # LocalEntryNotFoundError: unreachable mid-way, not cached
            raise ModelLoadError(f"Hub GGUF {hub}: {name} could not be downloaded ({_one_line(exc)})") from None
    return ResolvedGguf(paths[0], hub.repo_id, _as_tuple(card_base))


def _from_cache(hub: HubGguf, reason: str) -> ResolvedGguf:
    """The cached copy of ``hub`` (the snapshot of the repo's main branch), when the Hub cannot be asked."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=hub.repo_id, repo_type="model")
    ref = storage / "refs" / constants.DEFAULT_REVISION
    snapshot = storage / "snapshots" / ref.read_text().strip() if ref.is_file() else None
    cached = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.gguf") if p.is_file()) if snapshot else []
    if not cached:
        raise ModelLoadError(
            f"Hub GGUF {hub} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot be reached "
            f"({reason}): connect once to download it, or set --base_model to a local .gguf file"
        )
    names = _pick(hub, cached, "the cached copy of the repo")
    logger.info("Hub not reachable (%s): base model %s from the Hugging Face cache", reason, hub)
    return ResolvedGguf(snapshot / names[0], hub.repo_id)


def _pick(hub: HubGguf, files: Iterable[str], where: str) -> list[str]:
    """The file(s) of ``files`` that ``hub`` names: one file, or every part of one split GGUF (the first part first)."""
    # Projector files of multimodal repos are GGUFs too, but never a language model llama.cpp could serve alone.
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf") and not Path(f).name.lower().startswith("mmproj"))
    if hub.filename is not None:
        matches = [f for f in ggufs if f == hub.filename.strip("/")]
        asked = f"no file {hub.filename}"
    else:
        quant = re.compile(rf"(?<![a-z0-9]){re.escape(hub.quant.lower())}(?![a-z0-9_])")  # Q4_K must not match Q4_K_M
        matches = [f for f in ggufs if quant.search(f.lower())]
        asked = f"no .gguf file matching {hub.quant!r}"
    split_sets = {_SPLIT.sub("", f) for f in matches}
    if not matches:
        raise ModelLoadError(f"Hub GGUF {hub}: {where} has {asked}; its GGUF files: {_listing(ggufs)}")
    if len(split_sets) > 1:
        raise ModelLoadError(
            f"Hub GGUF {hub}: {hub.quant or hub.filename!r} matches several files: {_listing(matches)}; "
            f"name one exactly, e.g. --base_model {hub.repo_id}/{matches[0]}"
        )
    if len(matches) == 1 and not _SPLIT.search(matches[0]):
        return matches
    # A split GGUF: llama.cpp opens the first part and finds the others beside it, so all of them are needed.
    stem = split_sets.pop()
    parts = sorted(f for f in ggufs if _SPLIT.sub("", f) == stem and _SPLIT.search(f))
    total = int(_SPLIT.search(parts[0]).group(2))
    if len(parts) != total:
        raise ModelLoadError(f"Hub GGUF {hub}: {where} has {len(parts)} of the {total} parts of {stem}-*.gguf")
    return parts


def _listing(names: list[str]) -> str:
    if not names:
        return "none"
    more = f" … and {len(names) - _LISTED} more" if len(names) > _LISTED else ""
    return ", ".join(names[:_LISTED]) + more


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "no answer from the Hub": offline mode, and the transport errors (refused, timed out, cut)
    of whichever HTTP client this huggingface_hub uses: httpx2 in its 2.x releases, httpx in 1.x."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _status(exc: Any) -> int:
    response = getattr(exc, "response", None)
    return int(getattr(response, "status_code", 0) or 0)


def _hub_error(hub: HubGguf, exc: BaseException) -> ModelLoadError:
    """One line for a refused request, without the server's text (which could echo what the request carried)."""
    status = _status(exc)
    if type(exc).__name__ == "RepositoryNotFoundError":  # the Hub answers 401 for a missing repo without a token
        why = (f"repository {hub.repo_id} was not found ({status or 'not found'}): check the name, or, for a private "
               "or gated repo, the token (HF_TOKEN or `hf auth login`)")
    elif status in (401, 403) or type(exc).__name__ == "GatedRepoError":
        why = (f"the Hub refused access ({status or 'gated'}): the repo is private or gated, and the token (HF_TOKEN "
               "or `hf auth login`) is missing, invalid or lacks access")
    elif status == 404:
        why = f"repository {hub.repo_id} or the file was not found (404); check the name"
    else:
        why = f"the Hub answered {status or type(exc).__name__}: {_one_line(exc)}"
    if hub.filename and not hub.quant:  # owner/repo/file.gguf reads like a path too: it may be a mistyped one
        why += f" (nor is there a local file {hub.repo_id}/{hub.filename})"
    return ModelLoadError(f"Hub GGUF {hub}: {why}")


def _one_line(exc: BaseException) -> str:
    """The first line of an error, scrubbed of the token in case a server echoed it."""
    from huggingface_hub import get_token

    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    token = get_token()
    return text.replace(token, "***") if token else text


def _as_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(v for v in value or () if isinstance(v, str))


# --- The transformers checkpoint of a GGUF base, which the LoRA trainer needs --------------------------------------

_SOURCE_KEYS = (
    "general.source.repo_url",  # gguf-py Keys.General.SOURCE_REPO_URL: the repo the weights were converted from
    "general.source.url",  # Keys.General.SOURCE_URL
    "general.source.huggingface.repository",  # what older llama.cpp converters wrote: "owner/repo"
)


def transformers_checkpoint(gguf: ResolvedGguf) -> str:
    """The Hub id of the transformers checkpoint whose weights ``gguf`` holds.

    Taken from the GGUF's ``general.source.*`` keys (the repo it was converted from), else from a base-model entry that
    names the GGUF's own model: ``general.base_model.N.repo_url`` or, for a Hub GGUF, its repo card's ``base_model``
    (a quantised repo lists its source there), when that model's name is the GGUF's own (``general.name``, or the repo's
    name without ``-GGUF``). The name check matters: llama.cpp's converter copies the source card's ``base_model`` into
    ``general.base_model.*``, so for an Instruct model it names the model it was fine-tuned *from*, whose weights differ.
    Raises :class:`UnknownCheckpointError` when nothing qualifies.
    """
    from pubmedqa.gguf.header import read_gguf_header

    try:
        values = read_gguf_header(gguf.path).values
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{gguf.path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    for key in _SOURCE_KEYS:
        repo = _hub_repo(values.get(key))
        if repo:
            logger.info("GGUF %s was converted from %s (%s)", gguf.path.name, repo, key)
            return repo
    listed = [(f"general.base_model.{i}.repo_url", _hub_repo(values.get(f"general.base_model.{i}.repo_url")))
              for i in range(int(values.get("general.base_model.count", 0) or 0))]
    listed += [(f"the repo card's base_model of {gguf.repo_id}", _hub_repo(b)) for b in gguf.card_base_models]
    own = {_name(values.get("general.name"))}
    if gguf.repo_id:
        own.add(_name(re.sub(r"[-_.]gguf$", "", gguf.repo_id.split("/")[-1], flags=re.IGNORECASE)))
    own.discard("")
    same = sorted({repo for _, repo in listed if repo and _name(repo.split("/")[-1]) in own})
    if len(same) == 1:
        logger.info("GGUF %s holds the weights of %s (its base-model entry of the same name)", gguf.path.name, same[0])
        return same[0]
    seen = "; ".join(f"{where} is {repo}" for where, repo in listed if repo)
    if same:
        detail = f"several base-model entries name it: {', '.join(same)}"
    elif seen:
        detail = f"{seen}: a model it was derived from, not {values.get('general.name') or 'its own weights'}"
    else:
        detail = "it has no general.source.repo_url and no base-model entry"
    raise UnknownCheckpointError(f"{gguf.path.name} does not say which transformers checkpoint it was converted from ({detail})")


def _hub_repo(value: Any) -> str | None:
    """The Hub repo id of a metadata value: a huggingface.co URL or a bare owner/name."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    url = _HUB_URL.match(value)
    if url:
        return url["repo"]
    return value if re.fullmatch(_REPO, value) else None


def _name(value: Any) -> str:
    """A model name for comparison: "Qwen2.5 1.5B Instruct" and "Qwen2.5-1.5B-Instruct" are the same."""
    return re.sub(r"[^a-z0-9]", "", value.lower()) if isinstance(value, str) else ""
