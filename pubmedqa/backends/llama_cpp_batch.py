"""Several greedy answers decoded together on one llama.cpp context: the evaluation's path on the llama.cpp engine.

One answer at a time, each decoding step reads all the weights (262k-row output matrix included) for one token, so
a CPU decodes at its memory bandwidth (about 65 tokens/s for Gemma 3 270M on 2 cores). Here the rows of a batch keep
their own sequence in the KV cache (the context has one cell stream per sequence, ``n_seq_max``) and every step
decodes one token of each unfinished row in a single ``llama_decode``, so the weights are read once per step for all
of them; a sequence whose answer ends takes the next row's prompt at once, so the steps stay full. The prompts are
still decoded one by one, each from an emptied stream, which keeps the decision probe's features per prompt
(``llama_cpp_features.py``) and costs nothing: a long prompt is compute-bound already.

Greedy decoding, the first step's decision processor and the answer-only repetition penalty behave exactly as in
the one-row path (``LlamaCppBackend._generate_row``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pubmedqa.backends.base import GenerationSettings
from pubmedqa.prompts import cut_at_stop

#: Rows decoded together: beyond this, a step is compute-bound and grows with the rows (measured on 2 cores).
PARALLEL_ROWS = 8


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
    """Decodes prompts into their own sequences and then their answers step by step, all rows in one call per step.

    ``llm`` is a ``llama_cpp.Llama`` whose context was created with ``n_seq_max >= rows`` (``open_llama``);
    ``context``, another context on the same model, is decoded instead of ``llm``'s own (``llama_cpp_native``)."""

    def __init__(self, llm: Any, n_batch: int, context: Any = None):
        import llama_cpp

        from pubmedqa.backends.llama_cpp_native import new_batch

        self._llm = llm
        self._context = context
        self._n_batch = n_batch
        self._vocab = llama_cpp.llama_model_get_vocab(llm.model)
        self._owner = new_batch(n_batch)  # frees the batch with itself
        self.end_tokens = end_of_generation_tokens(llm)

    @property
    def context(self) -> Any:
        """The ``llama_cpp._internals.LlamaContext`` decoded into (what a llama.cpp sampler reads from)."""
        from pubmedqa.backends.llama_cpp_native import main_context

        return self._context or main_context(self._llm)

    def _decode(self, entries: Sequence[tuple[int, int, int, bool]]) -> None:
        """One ``llama_decode`` of (token, position, sequence, wants logits) entries."""
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
        """The logits of the ``index``-th output of the last decode (-1: the last): a writable view of llama.cpp's
        own buffer, which its sampler reads."""
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
            self._decode([(t, start + i, sequence, wanted[i]) for i, t in enumerate(piece)])
            # Read before the next piece's decode overwrites them; llama.cpp indexes them by batch position.
            rows += [self.logits(i).copy() for i in range(len(piece)) if wanted[i]]
        return rows[0] if outputs == 1 else np.stack(rows)

    def is_end(self, token: int) -> bool:
        """Whether ``token`` ends a generation (end of sequence, end of turn, ...)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))

    def step(self, sequence: int, token: int, position: int) -> np.ndarray:
        """Decode one ``token`` of ``sequence`` at ``position``; its logits (a writable view, as :meth:`logits`)."""
        self._decode([(token, position, sequence, True)])
        return self.logits(-1)

    def clear(self, sequence: int) -> None:
        """Empty ``sequence``'s cells, for the next prompt."""
        import llama_cpp

        llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(self.context.ctx), sequence, -1, -1)

    def answers(
        self,
        rows: int,
        start: Callable[[int, int], tuple[int, np.ndarray]],
        max_new_tokens: int,
        repetition_penalty: float,
        decode: Callable[[list[int]], str],
        stops: Sequence[str],
        min_new_tokens: int = 0,
        sequences: int = PARALLEL_ROWS,
    ) -> list[str]:
        """Greedy answers of ``rows`` rows, up to ``sequences`` at once; the raw decoded text of each.

        ``start(row, sequence)`` decodes the row's prompt into the (empty) ``sequence`` and returns the prompt's length
        and the first step's logits (the decision processor already applied). A sequence whose answer has ended takes
        the next row at once (continuous batching): otherwise every step of a group waits for its longest answer with
        fewer and fewer rows, while a step costs little more for 8 rows than for 1."""
        tokens: list[list[int]] = [[] for _ in range(rows)]
        texts = [""] * rows
        row_of: dict[int, int] = {}
        positions: dict[int, int] = {}
        current: dict[int, np.ndarray] = {}
        waiting = iter(range(rows))

        def take_next(sequence: int) -> None:
            row = next(waiting, None)
            if row is not None:
                self.clear(sequence)
                row_of[sequence] = row
                positions[sequence], current[sequence] = start(row, sequence)

        for sequence in range(min(sequences, rows)):
            take_next(sequence)
        while current:
            following: list[tuple[int, int]] = []
            ended: list[int] = []
            for sequence, logits in current.items():
                row = row_of[sequence]
                constrain_step(logits, tokens[row], repetition_penalty, min_new_tokens, self.end_tokens)
                token = int(np.argmax(logits))
                if not self.is_end(token):
                    tokens[row].append(token)
                    texts[row] = decode(tokens[row])
                    if not cut_at_stop(texts[row], stops)[1] and len(tokens[row]) < max_new_tokens:
                        following.append((sequence, token))
                        continue
                ended.append(sequence)
            current = {}
            for sequence in ended:  # after every row has read its logits: a prompt's decode overwrites them
                take_next(sequence)
            if following:
                self._decode([(token, positions[sequence], sequence, True) for sequence, token in following])
                for index, (sequence, _) in enumerate(following):
                    positions[sequence] += 1
                    current[sequence] = self.logits(index)
        return texts


class StreamedAnswer:
    """One answer decoded token by token into one sequence of a :class:`BatchDecoder`'s context and chosen by
    llama.cpp's ``sampler`` (greedy, or top-p and temperature): a Chat answer, or one side of a Compare pair, whose
    two answers step in turn on two contexts."""

    def __init__(
        self,
        decoder: BatchDecoder,
        sampler: Any,
        settings: GenerationSettings,
        decode: Callable[[list[int]], str],
        stops: Sequence[str],
        sequence: int = 0,
    ):
        self._decoder, self._sampler, self._settings = decoder, sampler, settings
        self._decode, self._stops, self._sequence = decode, stops, sequence
        self._position = 0
        self.tokens: list[int] = []
        self.text = ""
        self.ended = False
        self.logits = np.empty(0, dtype=np.float32)

    def read_prompt(self, ids: Sequence[int]) -> None:
        """Decode the prompt into the emptied sequence; :attr:`logits` is then the first step's (writable, so the
        first step's decision processor can be applied to it before :meth:`step`)."""
        self._decoder.clear(self._sequence)
        self._decoder.prompt(self._sequence, ids)
        self.logits, self._position = self._decoder.logits(-1), len(ids)

    def step(self) -> bool:
        """Decode the previous token (if any) and choose the next; whether a token was added. :attr:`ended` says
        whether another step may follow (end of generation, a stop sequence or the token limit)."""
        if self.tokens:
            self.logits = self._decoder.step(self._sequence, self.tokens[-1], self._position)
            self._position += 1
        settings = self._settings
        constrain_step(
            self.logits, self.tokens, settings.repetition_penalty, settings.min_new_tokens, self._decoder.end_tokens
        )
        token = self._sampler.sample(self._decoder.context, -1)
        if self._decoder.is_end(token):
            self.ended = True
            return False
        self.tokens.append(token)
        self.text = self._decode(self.tokens)
        self.ended = cut_at_stop(self.text, self._stops)[1] or len(self.tokens) >= settings.max_new_tokens
        return True
