"""Every use of llama-cpp-python's private internals, in one place.

The engine needs what the public ``Llama`` class does not offer: a context created with an eval callback and a cell
stream per sequence (``_internals.LlamaContext`` put in place of ``Llama._ctx``), llama.cpp's sampler chain
(``_internals.LlamaSampler``), a raw batch (``_internals.LlamaBatch``) and the leading fields of ``struct
ggml_tensor`` with the ggml-base accessors. None of these is a stable API, so :func:`check_bindings` looks for each
of them before a model loads and names what an upgrade removed (the tests run it too), instead of a crash at the
first decode. (``llama_cpp_logging`` checks the one other internal it replaces, ``suppress_stdout_stderr``.)
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import inspect
import weakref
from pathlib import Path
from typing import Any

import llama_cpp
import llama_cpp._internals as llama_internals
from llama_cpp._ctypes_extensions import load_shared_library

#: The llama-cpp-python release these internals were read from (requirements.txt pins it).
TESTED_VERSION = "0.3.36"

_CONTEXT_FIELDS = ("n_ctx", "n_seq_max", "kv_unified", "swa_full", "cb_eval", "cb_eval_user_data")
_SAMPLER_METHODS = ("add_top_p", "add_temp", "add_dist", "accept")


class TensorHeader(ctypes.Structure):
    """The leading fields of ``struct ggml_tensor`` (ggml.h). Only this prefix is mirrored: it has kept its layout
    across ggml versions, while the fields after it have not."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
    ]


@functools.cache
def ggml_base() -> ctypes.CDLL:
    """libggml-base as bundled by llama-cpp-python; ``llama_cpp._ggml`` binds none of the tensor accessors."""
    lib = load_shared_library("ggml-base", Path(llama_cpp.__file__).parent / "lib")
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_is_contiguous.argtypes = [ctypes.c_void_p]
    lib.ggml_is_contiguous.restype = ctypes.c_bool
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    lib.ggml_backend_tensor_get.restype = None
    return lib


def check_bindings() -> None:
    """Raise RuntimeError naming every internal this module relies on that the installed llama-cpp-python lacks."""
    missing = []
    if "model" not in inspect.signature(llama_internals.LlamaContext.__init__).parameters:
        missing.append("_internals.LlamaContext(model=, params=)")
    for name in _SAMPLER_METHODS:
        if not hasattr(llama_internals.LlamaSampler, name):
            missing.append(f"_internals.LlamaSampler.{name}")
    for name in ("LlamaBatch", "LlamaTokenDataArray"):
        if not hasattr(llama_internals, name):
            missing.append(f"_internals.{name}")
    present = {name for name, *_ in llama_cpp.llama_context_params._fields_}
    missing += [f"llama_context_params.{name}" for name in _CONTEXT_FIELDS if name not in present]
    if "self._ctx" not in inspect.getsource(llama_cpp.Llama.__init__):
        missing.append("Llama._ctx (the context replace_context swaps)")
    try:
        ggml_base()
    except (OSError, AttributeError) as exc:
        missing.append(f"the ggml-base library's tensor accessors ({exc})")
    if missing:
        raise RuntimeError(
            f"llama-cpp-python {llama_cpp.__version__} lacks what the llama.cpp engine uses (written for "
            f"{TESTED_VERSION}): {'; '.join(missing)}. Install the version requirements.txt pins."
        )


def _context(llm: llama_cpp.Llama, n_ctx: int, n_seq_max: int, eval_callback: Any) -> llama_internals.LlamaContext:
    params = llama_cpp.llama_context_params.from_buffer_copy(llm.context_params)
    # A cell stream per sequence: a row's attention then never spans the others' cells, so its answer's first step
    # (its decision) is the same bit for bit whatever else runs. llama.cpp steps several streams in one graph only
    # when their ids are consecutive: the scheduler keeps its rows so (``Scheduler._compact``).
    params.n_seq_max, params.kv_unified, params.n_ctx = n_seq_max, False, n_ctx * n_seq_max
    # Sliding-window layers keep only their window per sequence (llama-cpp-python asks for full-size ones, for
    # prefix reuse, which every request here starts without): with 8 sequences that saves about 370 MB.
    params.swa_full = False
    # The context keeps only the callback's raw pointer: the caller keeps ``eval_callback`` alive as long.
    params.cb_eval = eval_callback if eval_callback is not None else llama_cpp.ggml_backend_sched_eval_callback()
    params.cb_eval_user_data = None
    # Registered with the model, which closes it before the model itself is freed.
    return llama_internals.LlamaContext(model=llm._model, params=params, verbose=False)


def replace_context(llm: llama_cpp.Llama, n_ctx: int, n_seq_max: int, eval_callback: Any = None) -> None:
    """Give ``llm`` a context of ``n_seq_max`` sequences of ``n_ctx`` tokens each, in separate cell streams, with
    ``eval_callback`` (a ``ggml_backend_sched_eval_callback``) called for every graph node: ``Llama`` offers
    neither, and llama.cpp reads both only when a context is created."""
    replacement = _context(llm, n_ctx, n_seq_max, eval_callback)
    # The old context stays registered in llm's exit stack; closing it twice is harmless.
    llm._ctx.close()
    llm._ctx = replacement
    # Freed while the bindings still exist: a Llama left to interpreter teardown can outlive llama_cpp._internals'
    # globals (depending on module teardown order) and fail in __del__.
    atexit.register(_close_if_alive, weakref.ref(llm))


def second_context(
    llm: llama_cpp.Llama, n_ctx: int, n_seq_max: int, eval_callback: Any = None
) -> llama_internals.LlamaContext:
    """Another context on ``llm``'s model (its weights shared, not copied), ``n_seq_max`` sequences of ``n_ctx``
    tokens each, with ``eval_callback`` as :func:`replace_context` sets it."""
    return _context(llm, n_ctx, n_seq_max, eval_callback)


def main_context(llm: llama_cpp.Llama) -> llama_internals.LlamaContext:
    """``llm``'s own context object."""
    return llm._ctx


def new_sampler(temperature: float, top_p: float, seed: int) -> llama_internals.LlamaSampler:
    """llama.cpp's own sampler chain for a sampled answer: top-p, then temperature, seeded (:func:`sample_logits`; a
    greedy answer takes the highest logit itself, ``llama_cpp_scheduler``)."""
    chain = llama_internals.LlamaSampler()
    chain.add_top_p(float(top_p), 1)
    chain.add_temp(float(temperature))
    chain.add_dist(int(seed))
    return chain


def candidate_array(n_vocab: int) -> llama_internals.LlamaTokenDataArray:
    """A reusable candidate list of the whole vocabulary, for :func:`sample_logits`."""
    return llama_internals.LlamaTokenDataArray(n_vocab=n_vocab)


def sample_logits(
    sampler: llama_internals.LlamaSampler, candidates: llama_internals.LlamaTokenDataArray, logits: Any
) -> int:
    """``sampler``'s choice from ``logits`` (a row's own array, wherever it lives), as ``llama_sampler_sample`` makes
    it from a context's buffer: every token as a candidate, the chain applied, the choice accepted."""
    candidates.copy_logits(logits)
    array = candidates.candidates
    # A sampler may point the array at a buffer of its own (top-p sorts into one): point it back at ours, and read the
    # choice through the pointer it leaves.
    array.data = candidates.candidates_data.ctypes.data_as(llama_cpp.llama_token_data_p)
    array.selected = -1
    llama_cpp.llama_sampler_apply(sampler.sampler, ctypes.byref(array))
    if not 0 <= array.selected < array.size:
        raise RuntimeError(f"llama.cpp's sampler chose no token (selected {array.selected})")
    token = int(array.data[array.selected].id)
    sampler.accept(token)
    return token


def new_batch(n_tokens: int) -> llama_internals.LlamaBatch:
    """A batch of up to ``n_tokens`` tokens, one sequence id each; its ``.batch`` is the ``llama_batch``, freed with
    the returned object."""
    return llama_internals.LlamaBatch(n_tokens=n_tokens, embd=0, n_seq_max=1, verbose=False)


def _close_if_alive(ref: weakref.ref[llama_cpp.Llama]) -> None:
    llm = ref()
    if llm is not None:
        llm.close()
