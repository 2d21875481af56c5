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
        spaces_between_special_tokens: passed to the tokenizer's ``decode`` (slow
            tokenizers honour it; fast ones join special tokens their own way).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.spaces = spaces_between_special_tokens
        self.ids: list[int] = []
        self.text = ""
        self._prefix = self._read = 0  # window start; tokens before _read are in ``text``

    def decode(self, ids: list[int]) -> str:
        kw = {} if self.spaces else {"spaces_between_special_tokens": False}
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip, **kw)

    def add(self, token_id: int) -> str:
        """Appends a token; returns the text it completes (may be empty)."""
        self.ids.append(token_id)
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            delta = after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
            self.text += delta
            return delta
        return ""

    def add_all(self, ids: list[int]) -> str:
        """Feeds the ids of ``ids`` not fed yet (a completion so far); returns the new
        text."""
        new = "".join(self.add(t) for t in ids[len(self.ids):])
        return new

    def flush(self) -> str:
        """The text including any tokens still held back (at the end of a sequence)."""
        if self._read < len(self.ids):
            before = self.decode(self.ids[self._prefix:self._read])
            self.text += self.decode(self.ids[self._prefix:])[len(before):]
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
    arrival: float  # perf_counter() when it arrived (latency is counted from it)


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
        self._done: set[int] = set()  # seq ids of finished samples of unfinished requests

    def add_request(self, index: int, request_id: str, prompt: str | None,
                    prompt_token_ids: list[int], samples: list[Sequence],
                    arrival: float | None = None) -> None:
        """Tracks a request whose samples the engine will generate (``arrival``: when it
        came, default when this processor started)."""
        self._requests[index] = _Request(request_id, prompt, prompt_token_ids, samples,
                                         len(samples), self.start if arrival is None
                                         else arrival)

    def snapshot(self, index: int) -> RequestOutput:
        """A streamed request's output so far (``finished`` False): each sample's tokens,
        logprobs and text; text that may still turn out to start a stop string is held
        back (vLLM's rule)."""
        req = self._requests[index]
        outs = []
        for s in req.samples:
            text = self._text.get(s.seq_id)
            if text is None and self.tokenizer is not None:
                detok = self._detokenizer(s)
                detok.add_all(s.output_token_ids)
                text = detok.text
                if s.params.stop and s.finish_reason is None:
                    hold = max(len(x) for x in s.params.stop) - 1
                    text = text[:len(text) - hold] if hold else text
            outs.append(self._completion_of(s, text or ""))
        return self._output(req, outs, finished=False)

    def abort(self, index: int) -> RequestOutput:
        """Ends every unfinished sample of a request (``finish_reason`` "abort", what it
        had kept) and returns the request's final output."""
        req = self._requests[index]
        out = None
        for s in req.samples:
            if s.finish_reason is None:
                s.finish_reason = "abort"
            if s.seq_id not in self._done:
                out = self._sample_done(s) or out
        if out is None:
            raise RuntimeError(f"request {req.id!r} did not end at its abort (a bug)")
        return out

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
        detok = self._detokenizer(seq)
        old = len(detok.text)
        if not detok.add_all(seq.output_token_ids):
            return False
        if len(seq.output_token_ids) <= seq.params.min_tokens:  # vLLM: none counts yet
            return False
        longest = max(len(s) for s in seq.params.stop)
        start = max(0, old - longest + 1)  # a match must end in the new text
        hits = [(i, s) for s in seq.params.stop if (i := detok.text.find(s, start)) >= 0]
        if not hits:
            return False
        cut, stop = min(hits)
        if seq.params.include_stop_str_in_output:
            cut += len(stop)
        self._text[seq.seq_id] = detok.text[:cut]
        seq.finish_reason, seq.stop_reason = "stop", stop
        return True

    def _detokenizer(self, seq: Sequence) -> IncrementalDetokenizer:
        detok = self._detok.get(seq.seq_id)
        if detok is None:
            p = seq.params
            detok = self._detok[seq.seq_id] = IncrementalDetokenizer(
                self.tokenizer, p.skip_special_tokens, p.spaces_between_special_tokens)
        return detok

    def _sample_done(self, seq: Sequence) -> RequestOutput | None:
        req = self._requests[seq.request_index]
        req.unfinished -= 1
        self._done.add(seq.seq_id)
        if req.unfinished:
            return None
        del self._requests[seq.request_index]
        self._done.difference_update(s.seq_id for s in req.samples)
        return self._output(req, [self._completion(s) for s in req.samples], finished=True)

    def _output(self, req: _Request, outs: list[CompletionOutput], finished: bool
                ) -> RequestOutput:
        first = req.samples[0]
        return RequestOutput(
            request_id=req.id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            prompt_logprobs=self._decoded(first.prompt_logprobs), outputs=outs,
            finished=finished, num_cached_tokens=first.num_cached_tokens,
            latency_s=time.perf_counter() - req.arrival)

    def _completion(self, s: Sequence) -> CompletionOutput:
        text = self._text.pop(s.seq_id, None)
        detok = self._detok.pop(s.seq_id, None)
        if text is None:
            if self.tokenizer is None:
                text = ""
            elif detok is not None:  # stop strings were watched: finish the same text
                detok.add_all(s.output_token_ids)
                text = detok.flush()
            else:  # one decode of the whole completion
                text = IncrementalDetokenizer(
                    self.tokenizer, s.params.skip_special_tokens,
                    s.params.spaces_between_special_tokens).decode(s.output_token_ids)
        return self._completion_of(s, text)

    def _completion_of(self, s: Sequence, text: str) -> CompletionOutput:
        asked = s.params.logprobs is not None
        return CompletionOutput(
            index=s.sample_index, text=text, token_ids=list(s.output_token_ids),
            cumulative_logprob=s.cumulative_logprob if asked else None,
            logprobs=list(self._decoded(s.logprobs)) if asked else None,
            finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            num_preemptions=s.num_preemptions,
            routed_experts=None if s.routed is None or s.finish_reason is None
            else s.routed[:s.num_tokens - 1].copy())

    def _decoded(self, entries: list | None) -> list | None:
        """Fills each ``Logprob.decoded_token`` (one batched decode per list)."""
        if entries is None or self.tokenizer is None:
            return entries
        ids = sorted({t for e in entries if e for t, lp in e.items()
                      if lp.decoded_token is None})  # (a streamed request's: new ones)
        if not ids:
            return entries
        texts = dict(zip(ids, self.tokenizer.batch_decode([[t] for t in ids])))
        for e in entries:
            for t, lp in (e or {}).items():
                if lp.decoded_token is None:
                    lp.decoded_token = texts[t]
        return entries
