"""The decision probe's features from llama.cpp, read during the prompt's own decode.

A fine-tuned model's yes/no/maybe comes from the decision probe (:mod:`pubmedqa.decisions.probe`): a logistic
regression on the output of decoder layer ``layer - 1`` over the prompt (its mean, and its last token's). The
transformers engine reads it with a forward hook (:class:`pubmedqa.engines.transformers_passes.ProbeReader`); here
llama.cpp hands the same tensor (its graph names it ``l_out-{layer - 1}``) to the context's eval callback while it
decodes the prompt, so the features cost no second pass over the prompt.

The name is the same for every architecture: each decoder graph in llama.cpp's ``src/models/`` (``gemma3.cpp``,
``llama.cpp``, ``qwen2.cpp``, ...) ends layer ``il`` with ``cb(cur, "l_out", il)``, the residual stream after the
feed-forward block, which is transformers' ``hidden_states[il + 1]`` (``tests/test_gguf_lora_architectures.py`` checks
it for tiny Llama, Qwen2 and Gemma 3 models). A graph that names no such tensor leaves the reader empty, and
:meth:`HiddenStateReader.features` refuses, naming the model's architecture.

Usage: the engine gives its fine-tuned context the reader of :func:`reader_for`, and its scheduler arms it around
each piece of a fine-tuned row's prompt (``llama_cpp_scheduler.py``, ``armed(resume=...)``); the probe-fitting
command takes a ``Llama`` and its reader from :func:`open_llama` and reads with :func:`prompt_features` (one prompt,
from an empty cache).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import llama_cpp
import numpy as np
import torch

from pubmedqa.decisions.probe import pooled_features
from pubmedqa.engines.llama_cpp_native import TensorHeader, ggml_base, replace_context

GGML_TYPE_F32 = 0


@dataclasses.dataclass(frozen=True)
class ReaderState:
    """A :class:`HiddenStateReader`'s sum, last token and token count at one moment."""

    sum: np.ndarray | None
    last: np.ndarray | None
    count: int


class HiddenStateReader:
    """Sums the output of decoder layer ``layer - 1`` (``l_out-{layer - 1}``, n_embd x n_tokens f32) over the tokens
    decoded while :meth:`armed` and keeps the last token's; :meth:`features` is then the probe's feature row.

    A context reports to it when created with its :attr:`callback` (:func:`open_llama`, ``llama_cpp_native``).
    The callback runs for every graph node of every decode, generation steps included, so unarmed it answers
    "not needed" without looking at the node. A prompt longer than the micro-batch arrives in several graph computes:
    the sum and the token count simply run on. Not thread-safe, like the ``Llama`` it serves.
    """

    def __init__(self, layer: int, architecture: str | None = None):
        if layer < 1:
            raise ValueError(f"the probe reads the output of decoder layer layer - 1; layer must be >= 1, got {layer}")
        self.layer = layer
        self.tensor_name = f"l_out-{layer - 1}"
        self.architecture = architecture  # the model's general.architecture, for a clearer refusal only
        self._armed = False
        self._sum: np.ndarray | None = None
        self._last: np.ndarray | None = None
        self._count = 0
        self._error: str | None = None
        # Kept on the instance: the context holds only the raw function pointer, and a collected trampoline would
        # crash the next decode.
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(self._make_callback())

    def _make_callback(self) -> Any:
        get_name = ggml_base().ggml_get_name
        wanted = self.tensor_name.encode()
        accumulate = self._accumulate

        def on_node(tensor: int, ask: bool, _user_data: Any) -> bool:
            if ask:
                return self._armed and get_name(tensor) == wanted
            accumulate(tensor)
            # False would make the scheduler stop computing the rest of the graph.
            return True

        return on_node

    @property
    def callback(self) -> Any:
        """The eval callback to create a context with (``llama_cpp_native``); this reader keeps it alive."""
        return self._callback

    def reset(self) -> None:
        self._sum, self._last, self._count, self._error = None, None, 0, None

    def snapshot(self) -> ReaderState:
        """What has been collected so far (a prompt's start, for :meth:`armed`'s ``start``)."""
        return ReaderState(None if self._sum is None else self._sum.copy(),
                           None if self._last is None else self._last.copy(), self._count)

    @contextlib.contextmanager
    def armed(self, resume: bool = False, start: ReaderState | None = None) -> Iterator[HiddenStateReader]:
        """Collect the tokens decoded inside the ``with`` block (the prompt), forgetting any earlier prompt; with
        ``resume``, adding them to the last block's (the next piece of a prompt read in pieces, other rows' decodes
        in between left out); with ``start``, adding them to that :meth:`snapshot` (a prompt whose start was read
        once for all, its cells copied)."""
        if start is not None:
            self._sum, self._last, self._count, self._error = start.sum, start.last, start.count, None
        elif not resume:
            self.reset()
        self._armed = True
        try:
            yield self
        finally:
            self._armed = False

    @property
    def n_tokens(self) -> int:
        return self._count

    def features(self, expected_tokens: int | None = None) -> torch.Tensor:
        """The captured tokens' mean hidden state and the last one's, 1 x 2 n_embd float32 (``pooled_features``);
        with ``expected_tokens`` (the prompt's length), refused unless it covers exactly that many tokens."""
        if self._error is not None:
            raise RuntimeError(f"reading {self.tensor_name} from llama.cpp failed: {self._error}")
        if self._sum is None or self._count == 0:
            graph = (f"; does llama.cpp's {self.architecture} graph name a layer's output so?"
                     if self.architecture else "")
            raise RuntimeError(f"no {self.tensor_name} was computed while the reader was armed{graph}")
        if expected_tokens is not None and self._count != expected_tokens:
            raise RuntimeError(f"{self.tensor_name} covered {self._count} of the prompt's {expected_tokens} tokens")
        mean = torch.from_numpy((self._sum / self._count).astype(np.float32)).unsqueeze(0)
        return pooled_features(mean, torch.from_numpy(self._last).unsqueeze(0))

    def _accumulate(self, tensor: int) -> None:
        # An exception must not escape into ctypes (it would be printed and the node reported as unread), so it is
        # kept for features() to raise.
        try:
            header = TensorHeader.from_address(tensor)
            n_embd, n_tokens, ne2, ne3 = header.ne
            lib = ggml_base()
            if header.type != GGML_TYPE_F32 or ne2 != 1 or ne3 != 1 or not lib.ggml_is_contiguous(tensor):
                raise ValueError(
                    f"expected a contiguous f32 n_embd x n_tokens tensor, got type {header.type} ne {tuple(header.ne)}"
                )
            rows = np.empty((n_tokens, n_embd), dtype=np.float32)
            if lib.ggml_nbytes(tensor) != rows.nbytes:
                raise ValueError(f"tensor holds {lib.ggml_nbytes(tensor)} bytes, expected {rows.nbytes}")
            # Through the engine rather than tensor->data, so a GPU-resident tensor is copied back too.
            lib.ggml_backend_tensor_get(tensor, rows.ctypes.data, 0, rows.nbytes)
            total = rows.sum(axis=0, dtype=np.float64)
            self._sum = total if self._sum is None else self._sum + total
            self._last = rows[-1].copy()  # a prompt in several pieces ends in its last piece
            self._count += n_tokens
        except Exception as exc:  # noqa: BLE001
            self._error = self._error or f"{type(exc).__name__}: {exc}"


def open_llama(
    model_path: str,
    n_ctx: int,
    n_threads: int | None,
    feature_layer: int | None,
    *,
    n_batch: int = 512,
    n_ubatch: int = 512,
    n_seq_max: int = 1,
) -> tuple[llama_cpp.Llama, HiddenStateReader | None]:
    """A ``Llama`` for ``model_path`` and, with ``feature_layer`` (the probe's ``layer``), the reader its context
    reports to. With ``n_seq_max`` > 1 the context holds that many sequences of ``n_ctx`` tokens each, in separate
    cell streams (``llama_cpp_batch.py`` decodes them together). Without ``feature_layer`` the context has no
    callback at all, so decodes pay nothing."""
    llm = llama_cpp.Llama(
        model_path=model_path,
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_batch=n_batch,
        n_ubatch=n_ubatch,
        logits_all=False,
        verbose=False,
    )
    if feature_layer is None and n_seq_max == 1:
        return llm, None
    reader = None
    if feature_layer is not None:
        try:
            reader = reader_for(llm, feature_layer)
        except ValueError:
            llm.close()
            raise
    replace_context(llm, n_ctx, n_seq_max, reader.callback if reader is not None else None)
    return llm, reader


def reader_for(llm: llama_cpp.Llama, feature_layer: int) -> HiddenStateReader:
    """A reader of ``feature_layer`` checked against ``llm``'s model: the last layer's output keeps only the rows that
    need logits (llama.cpp's inp_out_ids), not every token, so it cannot be read."""
    n_layer = llama_cpp.llama_model_n_layer(llm.model)
    if not 1 <= feature_layer < n_layer:
        raise ValueError(
            f"feature_layer must lie in 1..{n_layer - 1} for this {n_layer}-layer model, got {feature_layer}"
        )
    return HiddenStateReader(feature_layer, llm.metadata.get("general.architecture"))


def prompt_features(llm: llama_cpp.Llama, reader: HiddenStateReader, tokens: Sequence[int]) -> torch.Tensor:
    """Decode the whole prompt ``tokens`` from an empty cache with the reader armed; return its probe features.

    The reset matters: ``Llama.generate`` would otherwise reuse a cached prefix and decode only the new suffix, and
    the features would cover those tokens alone. A following ``create_completion``/``generate`` with the same tokens
    finds the exact prompt cached and samples without decoding it again.
    """
    llm.reset()
    with reader.armed():
        llm.eval(tokens)
    return reader.features(expected_tokens=len(tokens))
