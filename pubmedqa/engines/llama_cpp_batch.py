"""The llama.cpp engine's one decode loop: every answer (a Chat answer, a side of a Compare pair, the rows of an
evaluation batch) is a row of a :class:`DecodeLoop` on a :class:`BatchDecoder`'s context.

Each row keeps its own sequence in the KV cache and every step decodes the last token of each unfinished row in one
``llama_decode``, so the weights are read once per step for all rows; a row that ends hands its sequence to the next
waiting prompt. Prompts are read one by one into an emptied sequence (:meth:`BatchDecoder.read_prompt`, all that
decision scoring decodes), which keeps the probe's features per prompt. Every step of every row follows the same
rules: the decision processor on the first step, :func:`constrain_step` on each, greedy or llama.cpp's sampler. Why
rows are batched and how far it pays: docs/hardware.md ("The llama.cpp engine's decode loop").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pubmedqa.engines.base import GenerationSettings
from pubmedqa.prompts import cut_at_stop

if TYPE_CHECKING:
    import torch

    from pubmedqa.engines.llama_cpp_features import HiddenStateReader

#: Rows decoded together: beyond this, a step is compute-bound and grows with the rows (measured on 2 cores).
PARALLEL_ROWS = 8
#: Positions whose logits one ``llama_decode`` of :meth:`BatchDecoder.score` outputs (64 rows: 64 MB at 262k).
SCORE_CHUNK = 64


def penalise_repeats(logits: np.ndarray, tokens: Sequence[int], penalty: float) -> None:
    """CTRL's repetition penalty on the answer's own ``tokens``, in place, as transformers'
    ``RepetitionPenaltyLogitsProcessor`` applies it (llama.cpp's penalties sampler would also count the prompt)."""
    seen = np.unique(np.asarray(tokens))
    values = logits[seen]
    logits[seen] = np.where(values > 0, values / penalty, values * penalty)


def constrain_step(
    logits: np.ndarray, tokens: Sequence[int], repetition_penalty: float, min_new_tokens: int, end_tokens: np.ndarray
) -> None:
    """The rules every answer's next step obeys, in place on its logits before a token is chosen: the answer-only
    repetition penalty, and no end of generation before ``min_new_tokens``."""
    if tokens and repetition_penalty != 1.0:
        penalise_repeats(logits, tokens, repetition_penalty)
    if len(tokens) < min_new_tokens:
        logits[end_tokens] = -np.inf


def end_of_generation_tokens(llm: Any) -> np.ndarray:
    """Every token llama.cpp ends a generation on (end of sequence, end of turn, ...), for a minimum answer length."""
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return np.array([t for t in range(llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)], dtype=np.int64)


class BatchDecoder:
    """One llama.cpp context's decoding: prompts into their own (emptied) sequences, then one token of each of
    several sequences per ``llama_decode``; what a :class:`DecodeLoop` and decision scoring decode through.

    ``llm`` is a ``llama_cpp.Llama`` whose context was created with ``n_seq_max`` sequences (``open_llama``);
    ``context``, another context on the same model, is decoded instead of ``llm``'s own (``llama_cpp_native``)."""

    def __init__(self, llm: Any, n_batch: int, context: Any = None):
        import llama_cpp

        from pubmedqa.engines.llama_cpp_native import new_batch

        self._llm = llm
        self._context = context
        self._n_batch = n_batch
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._owner = new_batch(n_batch)  # frees the batch with itself
        self.end_tokens = end_of_generation_tokens(llm)

    @property
    def context(self) -> Any:
        """The ``llama_cpp._internals.LlamaContext`` decoded into (what a llama.cpp sampler reads from)."""
        from pubmedqa.engines.llama_cpp_native import main_context

        return self._context or main_context(self._llm)

    def decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) entries; :meth:`logits` then reads a wanted
        entry's logits by its position in ``entries`` (-1: the last one), as llama.cpp indexes them."""
        import llama_cpp

        batch = self._owner.batch
        batch.n_tokens = len(entries)
        for i, (token, position, sequence, logits) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, logits
            batch.seq_id[i][0] = sequence
        code = llama_cpp.llama_decode(self.context.ctx, batch)
        if code != 0:
            raise RuntimeError(f"llama_decode failed ({code}) for {len(entries)} tokens")

    def logits(self, index: int) -> np.ndarray:
        """The logits of the last decode's entry at batch position ``index`` (-1: the last output): a writable view of
        llama.cpp's own buffer, which its sampler reads."""
        import llama_cpp

        pointer = llama_cpp.llama_get_logits_ith(self.context.ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self._llm.n_vocab(),))

    def prompt(self, sequence: int, ids: Sequence[int], outputs: int = 1) -> np.ndarray:
        """Decode ``ids`` into ``sequence`` (empty) in micro-batch-sized pieces; copies of the logits of its last
        ``outputs`` positions (``outputs`` x vocab; one row, 1-D, by default)."""
        first_output = len(ids) - outputs
        rows: list[np.ndarray] = []
        for start in range(0, len(ids), self._n_batch):
            piece = ids[start : start + self._n_batch]
            wanted = [start + i >= first_output for i in range(len(piece))]
            self.decode([(t, start + i, sequence, wanted[i]) for i, t in enumerate(piece)])
            # Read before the next piece's decode overwrites them; llama.cpp indexes them by batch position.
            rows += [self.logits(i).copy() for i in range(len(piece)) if wanted[i]]
        return rows[0] if outputs == 1 else np.stack(rows)

    def score(self, sequence: int, ids: Sequence[int], top: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
        """``ids`` decoded into ``sequence`` (emptied first) with every position's logits, :data:`SCORE_CHUNK`
        positions per ``llama_decode`` so that llama.cpp's output buffer stays small (a 262k vocabulary is 1 MB a
        row); each chunk's rows scored at once (:func:`score_rows`) before the next overwrites them."""
        import llama_cpp
        import torch

        from pubmedqa.engines.base import score_rows

        self.clear(sequence)
        logprobs: list[float] = []
        tops: list[list[tuple[int, float]]] = []
        for start in range(0, len(ids), SCORE_CHUNK):
            piece = ids[start : start + SCORE_CHUNK]
            self.decode([(t, start + i, sequence, True) for i, t in enumerate(piece)])
            pointer = llama_cpp.llama_get_logits(self.context.ctx)
            rows = torch.from_numpy(np.ctypeslib.as_array(pointer, shape=(len(piece), self._llm.n_vocab())))
            chunk_logprobs, chunk_tops = score_rows(rows, ids[start + 1 : start + 1 + len(piece)], top)
            logprobs += chunk_logprobs
            tops += chunk_tops
        self.clear(sequence)
        return logprobs, tops

    def read_prompt(
        self, sequence: int, ids: Sequence[int], reader: HiddenStateReader | None = None
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """The prompt phase of every answer, and all that decision scoring decodes: ``ids`` decoded into
        ``sequence``, emptied first, with ``reader`` (this context's probe reader, for a fine-tuned row) armed
        around exactly that decode. A copy of the last position's logits (the first step's) and the probe's
        features over the whole prompt (None without a reader)."""
        self.clear(sequence)
        if reader is None:
            return self.prompt(sequence, ids), None
        with reader.armed():
            logits = self.prompt(sequence, ids)
        return logits, reader.features(expected_tokens=len(ids))

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends a generation (end of sequence, end of turn, ...)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def clear(self, sequence: int) -> None:
        """Empty ``sequence``'s cells, for the next prompt."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.context.ctx), sequence, -1, -1)


class Answer:
    """One row's answer in a :class:`DecodeLoop`: its sequence, the position its last token goes to, its tokens and
    raw decoded text so far, and the logits its next step chooses from."""

    def __init__(self, row: int, sequence: int, position: int, logits: np.ndarray):
        self.row, self.sequence, self.position = row, sequence, position
        #: The first step's (a copy, the decision processor applied), then a view of the row's output of the last
        #: decode, where constrain_step's changes are what llama.cpp's sampler reads.
        self.logits = logits
        self.output = -1  # that output's index among the last decode's (the prompt's last position: -1)
        self.tokens: list[int] = []
        self.text = ""
        self.ended = False


#: A loop's row start: ``start(row, sequence)`` decodes the row's prompt into the sequence
#: (:meth:`BatchDecoder.read_prompt`) and returns the prompt's length and the first step's logits, the decision
#: processor applied.
RowStart = Callable[[int, int], tuple[int, np.ndarray]]


class DecodeLoop:
    """The answers of ``rows`` on one :class:`BatchDecoder`'s context, up to ``sequences`` decoded together; iterating
    runs one step at a time and yields the answers that took a token in it, so a streamed caller can show them (and
    stop, or step another loop, in between). :attr:`answers` holds every started row's :class:`Answer` by row.

    Each step, every live row chooses its next token from its own logits (:func:`constrain_step`, then the highest
    logit, or ``sampler``, llama.cpp's top-p and temperature chain); a row ends at an end of generation token, a
    stop sequence in its text or ``settings.max_new_tokens``, and its sequence takes the next waiting row's prompt at
    once (continuous batching: otherwise every step of a group waits for its longest answer with fewer and fewer
    rows, while a step costs little more for 8 rows than for 1); then the last token of every live row is decoded in
    one ``llama_decode``. A new row chooses its first token at the next step, with the others."""

    def __init__(
        self,
        decoder: BatchDecoder,
        start: RowStart,
        rows: Iterable[int],
        settings: GenerationSettings,
        decode: Callable[[list[int]], str],
        stops: Sequence[str],
        sampler: Any = None,
        sequences: int = 1,
    ):
        if sampler is not None and sequences > 1:
            # The sampler reads llama.cpp's buffer, where a second row's prompt would overwrite a new row's first step.
            raise ValueError("a sampled loop decodes one row at a time")
        self._decoder, self._start, self._rows, self._settings = decoder, start, rows, settings
        self._detokenize, self._stops, self._sampler, self._sequences = decode, stops, sampler, sequences
        self.answers: dict[int, Answer] = {}

    def __iter__(self) -> Iterator[list[Answer]]:
        decoder = self._decoder
        waiting = iter(self._rows)
        live: list[Answer] = []

        def take(sequence: int) -> None:
            row = next(waiting, None)
            if row is None:
                return
            position, logits = self._start(row, sequence)
            if self._sampler is not None:
                # llama.cpp's sampler reads the context's own buffer: the first step's logits go back where the
                # prompt's decode left them (the loop's one row: nothing was decoded since).
                view = decoder.logits(-1)
                view[:] = logits
                logits = view
            answer = Answer(row, sequence, position, logits)
            self.answers[row] = answer
            live.append(answer)

        for sequence in range(self._sequences):
            take(sequence)
        while live:
            grown = [answer for answer in live if self._step(answer)]
            yield grown
            going = [answer for answer in live if not answer.ended]
            ended = [answer for answer in live if answer.ended]
            live = []
            for answer in ended:  # after every row has read its logits: a prompt's decode overwrites them
                take(answer.sequence)
            if going:
                decoder.decode([(answer.tokens[-1], answer.position, answer.sequence, True) for answer in going])
                for index, answer in enumerate(going):
                    answer.position += 1
                    answer.output, answer.logits = index, decoder.logits(index)
            live += going  # new rows first, then the others in their decode order

    def _step(self, answer: Answer) -> bool:
        """Choose ``answer``'s next token; whether one was added (not an end of generation). ``answer.ended`` then
        says whether the row is done."""
        settings, decoder = self._settings, self._decoder
        constrain_step(
            answer.logits, answer.tokens, settings.repetition_penalty, settings.min_new_tokens, decoder.end_tokens
        )
        if self._sampler is None:
            # llama.cpp's greedy sampler's choice too (the first highest logit), without the 262k-entry candidate
            # list it builds per call.
            token = int(np.argmax(answer.logits))
        else:
            token = self._sampler.sample(decoder.context, answer.output)
        if decoder.is_end(token):
            answer.ended = True
            return False
        answer.tokens.append(token)
        answer.text = self._detokenize(answer.tokens)
        answer.ended = cut_at_stop(answer.text, self._stops)[1] or len(answer.tokens) >= settings.max_new_tokens
        return True
