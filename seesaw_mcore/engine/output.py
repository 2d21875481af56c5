"""Output processing on rank 0: incremental detokenization, stop strings, and each request's
``RequestOutput`` once all its samples are done.

Token-level stops (EOS, stop token ids, ``max_tokens``, ``max_model_len``) are the engine's;
stop strings need text, so they are found here, as each token's text arrives, and the engine
is told to finish the sequence (``Engine.finish``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from seesaw_mcore.engine.request import CompletionOutput, RequestOutput, Sequence


class IncrementalDetokenizer:
    """Text of a growing list of token ids, decoding only a short window per token (vLLM's
    scheme: re-decode from ``prefix`` and keep what extends the text before ``read``; a
    token that ends in an incomplete UTF-8 sequence waits for the next).

    Args:
        tokenizer: a transformers tokenizer.
        skip_special_tokens: drop special tokens from the text.
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # window start; tokens before _read are in ``text``

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, token_id: int) -> str:
        """Appends a token; returns the text it completes (may be empty)."""
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def flush(self) -> str:
        """The text including any tokens still held back (at the end of a sequence)."""
        if self._read < len(self.ids):
            before = self._decode(self.ids[self._prefix:self._read])
            self.text += self._decode(self.ids[self._prefix:])[len(before):]
            self._prefix = self._read = len(self.ids)
        return self.text


@dataclass
class _Request:
    """A request being generated: what its output needs once every sample is done."""

    id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[Sequence]  # in sample order
    unfinished: int


class OutputProcessor:
    """Turns sequences' new tokens into finished ``RequestOutput`` objects.

    Args:
        tokenizer: a transformers tokenizer, or ``None`` (outputs carry token ids only).
    """

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.start = time.perf_counter()
        self._requests: dict[int, _Request] = {}  # admitted, not all samples finished
        self._detok: dict[int, IncrementalDetokenizer] = {}  # by seq id: with stop strings
        self._text: dict[int, str] = {}  # by seq id: text cut at a stop string

    def add_request(self, index: int, request_id: str, prompt: str | None,
                    prompt_token_ids: list[int], samples: list[Sequence]) -> None:
        """Tracks a request whose samples the engine will generate."""
        self._requests[index] = _Request(request_id, prompt, prompt_token_ids, samples,
                                         len(samples))

    def process(self, seqs: list[Sequence]
                ) -> tuple[list[Sequence], list[tuple[int, RequestOutput]]]:
        """Handles one step's sequences (each got one token).

        Returns:
            ``(stopped, finished)``: sequences a stop string ended (the engine must finish
            them), and ``(input index, output)`` of requests whose every sample is done.
        """
        stopped, finished = [], []
        for seq in seqs:
            # the last token allowed ("length") may still complete a stop string
            if (seq.finish_reason in (None, "length") and seq.params.stop
                    and self.tokenizer is not None):
                running = seq.finish_reason is None
                if self._stop_string(seq) and running:
                    stopped.append(seq)
            if seq.finish_reason is not None:
                out = self._sample_done(seq)
                if out is not None:
                    finished.append((seq.request_index, out))
        return stopped, finished

    def _stop_string(self, seq: Sequence) -> bool:
        """Feeds the new token's text; on a stop string, cuts the text before it and marks
        the sequence finished (vLLM: the stop string is not in the output)."""
        detok = self._detok.get(seq.seq_id)
        if detok is None:
            detok = self._detok[seq.seq_id] = IncrementalDetokenizer(self.tokenizer)
        old = len(detok.text)
        if not detok.add(seq.output_token_ids[-1]):
            return False
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, old - longest + 1)  # a match must end in the new text
        hits = [(i, s) for s in seq.params.stop if (i := detok.text.find(s, start)) >= 0]
        if not hits:
            return False
        cut, stop = min(hits)
        self._text[seq.seq_id] = detok.text[:cut]
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    def _sample_done(self, seq: Sequence) -> RequestOutput | None:
        req = self._requests[seq.request_index]
        req.unfinished -= 1
        if req.unfinished:
            return None
        del self._requests[seq.request_index]
        return RequestOutput(
            request_id=req.id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            outputs=[self._completion(s) for s in req.samples],
            latency_s=time.perf_counter() - self.start)

    def _completion(self, s: Sequence) -> CompletionOutput:
        text = self._text.pop(s.seq_id, None)
        detok = self._detok.pop(s.seq_id, None)
        if text is None:
            if detok is not None:
                text = detok.flush()
            elif self.tokenizer is not None:
                text = self.tokenizer.decode(s.output_token_ids, skip_special_tokens=True)
            else:
                text = ""
        return CompletionOutput(
            index=s.sample_index, text=text, token_ids=list(s.output_token_ids),
            finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            logprobs=s.logprobs if s.params.logprobs is not None else None,
            num_preemptions=s.num_preemptions)
