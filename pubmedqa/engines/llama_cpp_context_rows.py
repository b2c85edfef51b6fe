"""One llama.cpp context's share of the scheduler (``llama_cpp_scheduler.py``): the answers on it (:class:`Row`), the
work that needs it for one call (:class:`Job`), and its sequences (:class:`ContextRows`), the cached prompt start
included. How prompts are cut into pieces lives here too, so that a row's prompt and the cached start are read in the
same pieces."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pubmedqa.engines.base import GenerationSettings
from pubmedqa.engines.llama_cpp_batch import BatchDecoder

if TYPE_CHECKING:
    import torch  # noqa: F401 - in FirstStep's annotation

    from pubmedqa.engines.llama_cpp_features import HiddenStateReader, ReaderState

#: Prompt tokens read per step while other rows decode. Every prompt is read in the same pieces, alone or not, ending
#: at multiples of this, so that its first step is computed alike whatever else runs.
PREFILL_CHUNK = 128

#: llama.cpp's CPU matrix kernels take tokens in blocks of this many (a step's remainder goes through another path,
#: which rounds differently). A cached prompt start is a multiple of it: every later token then lies in the block it
#: has when the prompt is read whole, and gets the same result bit for bit.
KERNEL_ROWS = 4

#: Sequences a context has beyond its rows: one for jobs, one for the cached prompt start.
SPARE_SEQUENCES = 2

#: A row's first step: the prompt's last logits (a copy) and the probe's features (None without a reader) in; the
#: logits the first token is chosen from out (the decision processor applied).
FirstStep = Callable[[np.ndarray, "torch.Tensor | None"], np.ndarray]


class Row:
    """One answer on a context: its prompt, its own settings, and what it has produced so far.

    ``notify(row)`` is called from the scheduler's thread after each new token and once when the row is done
    (:attr:`done`; :attr:`error` says why it failed, if it did). ``generate=False`` reads the prompt only (decision
    scoring: the first step is all it needs). ``background`` rows (an evaluation) give way to the others."""

    def __init__(
        self,
        ids: Sequence[int],
        settings: GenerationSettings,
        stops: Sequence[str],
        notify: Callable[[Row], None],
        cancel: threading.Event,
        first_step: FirstStep | None = None,
        reads_features: bool = False,
        background: bool = False,
        generate: bool = True,
    ):
        self.ids, self.settings, self.stops, self.notify, self.cancel = list(ids), settings, stops, notify, cancel
        self.first_step, self.reads_features = first_step, reads_features
        self.background, self.generate = background, generate
        self.done = False
        self.error: BaseException | None = None
        self._reset()

    def _reset(self) -> None:
        """Back to the start (a background row whose sequence a visitor took starts again later)."""
        self.sequence: int | None = None
        self.read = 0  # prompt tokens decoded so far
        self.copied = 0  # of which copied from the cached prompt start
        self.tokens: list[int] = []
        self.text = ""
        self.logits: np.ndarray | None = None  # what the next token is chosen from (None: prompt still being read)
        self.undecoded = False  # the last token is chosen but not yet decoded
        self.sampler: Any = None
        if self.settings.temperature > 0:
            from pubmedqa.engines.llama_cpp_native import new_sampler

            self.sampler = new_sampler(self.settings.temperature, self.settings.top_p, self.settings.seed)

    @property
    def position(self) -> int:
        """Where the row's next decoded token goes in its sequence."""
        return self.read + len(self.tokens) - 1


class Job:
    """Work that needs a context to itself for one call between steps (scoring a text's tokens): ``run(decoder,
    sequence)`` on the context's spare sequence, emptied before and after."""

    def __init__(self, run: Callable[[BatchDecoder, int], Any]):
        self.run = run
        self.finished = threading.Event()
        self.result: Any = None
        self.error: BaseException | None = None


class ContextRows:
    """One context's share of the scheduler: its decoder and probe reader, ``rows`` sequences for answers and
    :data:`SPARE_SEQUENCES` more (jobs, the cached prompt start), the rows on them and the rows and jobs waiting."""

    def __init__(self, name: str, decoder: BatchDecoder, reader: HiddenStateReader | None, rows: int, window: int):
        self.name, self.decoder, self.reader, self.window = name, decoder, reader, window
        self.free = list(range(rows))
        self.job_sequence, self.prefix_sequence = rows, rows + 1
        self.prefix: list[int] = []  # the cached prompt start (none yet)
        self.prefix_state: ReaderState | None = None  # the probe reader's sums over it
        self.active: list[Row] = []
        self.waiting: deque[Row] = deque()
        self.background: deque[Row] = deque()
        self.jobs: deque[Job] = deque()
        self.candidates: Any = None  # llama.cpp's candidate array for sampled rows, made at the first one
        self.steps = 0

    def has_work(self) -> bool:
        return bool(self.active or self.waiting or self.background or self.jobs)

    def free_sequence(self, sequence: int) -> None:
        """``sequence`` (emptied) back among the free ones, lowest first: rows take the lowest free sequence."""
        self.free.append(sequence)
        self.free.sort()

    def cache_prefix(self, ids: Sequence[int]) -> None:
        """Read ``ids``, the start most prompts share (the instruction), once into the prefix sequence, cut to a
        multiple of :data:`KERNEL_ROWS`: a row whose prompt starts so gets a copy of its cells and reads the rest only
        (about half a question's prompt), with the same result as reading it whole. On the scheduler's thread, before
        any row."""
        ids = list(ids)[: len(ids) // KERNEL_ROWS * KERNEL_ROWS]
        self.decoder.clear(self.prefix_sequence)
        self.prefix, self.prefix_state = [], None
        if not ids:
            return
        read = 0
        with self.reader.armed() if self.reader is not None else contextlib.nullcontext():
            while read < len(ids):
                read = decode_piece(self.decoder, ids, read, self.prefix_sequence)
        self.prefix = ids
        self.prefix_state = self.reader.snapshot() if self.reader is not None else None

    def start_from_prefix(self, row: Row) -> None:
        """Give ``row`` (just admitted, empty) the cached prompt start's cells if its prompt begins with it."""
        n = len(self.prefix)
        if n and len(row.ids) > n and row.ids[:n] == self.prefix:
            self.decoder.copy(self.prefix_sequence, row.sequence)
            row.read = row.copied = n


def decode_piece(decoder: BatchDecoder, ids: Sequence[int], start: int, sequence: int) -> int:
    """Decode the piece of prompt ``ids`` that begins at ``start`` into ``sequence``: up to the next multiple of
    :data:`PREFILL_CHUNK` or the prompt's end, whose last token's logits are kept. Where the piece ends."""
    end = min(len(ids), (start // PREFILL_CHUNK + 1) * PREFILL_CHUNK)
    decoder.decode([(ids[i], i, sequence, i == len(ids) - 1) for i in range(start, end)])
    return end
