"""vLLM-style offline API: ``LLM(model=DIR).generate(prompts, SamplingParams(...))``.

SPMD: every rank constructs ``LLM`` and calls ``generate`` with the same arguments; rank 0
gets the ``RequestOutput`` list (in input order), other ranks get ``[]``. With one rank it
runs in a plain ``python`` process.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass

from seesaw_mcore.config import PhasePlan
from seesaw_mcore.engine.engine import CacheConfig, Engine
from seesaw_mcore.engine.request import CompletionOutput, RequestOutput, Sequence
from seesaw_mcore.engine.scheduler import SchedulerConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.sampling_params import SamplingParams

PromptType = str | dict


def sample_seed(seed: int, request_id: str, sample: int) -> int:
    """A 63-bit seed from ``(seed, request id, sample index)``, stable across runs and
    machines (BLAKE2b, not Python's salted ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\x00{request_id}\x00{sample}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


class LLM:
    """An offline generation engine over all ranks of the job.

    Args:
        model: local HF model folder (safetensors).
        prefill: parallel layout for prefill, e.g. ``"T2"``, ``"P2"``, ``"D2"``; ``"auto"``:
            the planner's best plan for this job's ranks (measured profile) and ``workload``.
        decode: layout for decode (``prefill="P2", decode="T2"`` re-shards between the
            phases on the same ranks); ``None`` or equal to ``prefill``: a static plan.
        dtype: ``auto`` (float32 on CPU ranks, checkpoint dtype on GPUs), ``float32``,
            ``bfloat16`` or ``float16``.
        seed: engine seed, used for requests whose ``SamplingParams.seed`` is ``None``.
        block_size / num_blocks / kv_cache_gib: device KV cache (see ``CacheConfig``).
        host_kv_tokens / host_kv_gib / prefetch_watermark: host KV tier of a re-sharding plan
            (see ``CacheConfig``).
        disk_path / disk_kv_tokens / disk_kv_gib: the optional disk KV tier (DeepSpeed AIO)
            behind the host tier; ``async_swap``: tier copies overlap compute.
        max_num_seqs / max_prefill_tokens / prefill_micro_batches / policy /
            refill_threshold: batching and the phase-switch policy (see ``SchedulerConfig``).
        max_model_len: longest prompt + output; default: the model's context.
        workload: with ``prefill="auto"``, the planner's workload preset.
    """

    def __init__(
        self,
        model: str,
        prefill: str = "T1",
        decode: str | None = None,
        dtype: str = "auto",
        seed: int = 0,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_gib: float = 1.0,
        host_kv_tokens: int | None = None,
        host_kv_gib: float = 1.0,
        prefetch_watermark: float = 0.01,
        disk_path: str | None = None,
        disk_kv_tokens: int | None = None,
        disk_kv_gib: float = 8.0,
        async_swap: bool = True,
        max_num_seqs: int = 256,
        max_prefill_tokens: int = 4096,
        prefill_micro_batches: int = 4,
        policy: str = "transition_minimizing",
        refill_threshold: float = 0.2,
        max_model_len: int | None = None,
        workload: str = "sharegpt",
    ) -> None:
        self.seed = seed
        if prefill == "auto":
            from seesaw_mcore.planner import choose_plan

            prefill, decode = choose_plan(model, workload)
        self.engine = Engine(
            model, PhasePlan.parse(prefill, decode), dtype=dtype,
            cache=CacheConfig(block_size=block_size, num_blocks=num_blocks,
                              kv_cache_gib=kv_cache_gib, host_kv_tokens=host_kv_tokens,
                              host_kv_gib=host_kv_gib,
                              prefetch_watermark=prefetch_watermark, disk_path=disk_path,
                              disk_kv_tokens=disk_kv_tokens, disk_kv_gib=disk_kv_gib,
                              async_swap=async_swap),
            scheduler=SchedulerConfig(max_num_seqs=max_num_seqs,
                                      max_prefill_tokens=max_prefill_tokens,
                                      prefill_micro_batches=prefill_micro_batches,
                                      policy=policy, refill_threshold=refill_threshold),
            max_model_len=max_model_len,
        )
        self.tokenizer = _load_tokenizer(model)
        self.eos_token_ids = _eos_ids(model, self.engine.model_cfg.eos_token_ids, self.tokenizer)

    @property
    def is_driver(self) -> bool:
        return self.engine.is_driver

    def generate(
        self,
        prompts: PromptType | Iterable[PromptType],
        sampling_params: SamplingParams | Iterable[SamplingParams] | None = None,
        use_tqdm: bool = True,
        on_output: Callable[[RequestOutput], None] | None = None,
        request_ids: Iterable[str] | None = None,
        on_reject: Callable[[str, str], None] | None = None,
        keep_outputs: bool = True,
    ) -> list[RequestOutput]:
        """Generates completions for every prompt.

        Prompts are pulled lazily as the scheduler has room (``Engine.lookahead``), and a
        finished request's state is dropped once it is handed over, so with an iterator,
        ``on_output`` and ``keep_outputs=False`` memory stays flat however many prompts
        there are.

        Args:
            prompts: strings or ``{"prompt_token_ids": [...]}`` dicts; a list or an iterator.
            sampling_params: one for all prompts, or one per prompt (default: vLLM's).
            use_tqdm: show a progress bar on rank 0.
            on_output: called on rank 0 with each ``RequestOutput`` as it finishes.
            request_ids: ids for the outputs (default ``"0"``, ``"1"``, ...).
            on_reject: called on rank 0 with ``(request id, message)`` for a prompt that
                cannot run (too long, bad token ids), which is then skipped; without it
                such a prompt is an error for the whole call.
            keep_outputs: return the outputs (else ``[]``: use ``on_output``).

        Returns:
            On rank 0, one ``RequestOutput`` per prompt that ran, in input order; ``[]``
            elsewhere.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        total = len(prompts) if isinstance(prompts, Sized) else None
        for name, given in (("SamplingParams", sampling_params), ("request ids", request_ids)):
            if total is not None and isinstance(given, Sized) and len(given) != total:
                raise SeesawError(f"got {len(given)} {name} for {total} prompts")
        if not self.is_driver:
            self.engine.run([], lambda s: False)
            return []
        start = time.perf_counter()
        live: dict[int, _Request] = {}  # admitted, not all samples finished
        results: dict[int, RequestOutput] = {}
        bar = _progress(total, use_tqdm)

        def after_token(seq: Sequence) -> bool:
            if not self._check_stop(seq):
                return False
            req = live[seq.request_index]
            req.unfinished -= 1
            if req.unfinished == 0:
                del live[seq.request_index]
                out = self._request_output(req, start)
                if keep_outputs:
                    results[seq.request_index] = out
                bar.update(1)
                if on_output is not None:
                    on_output(out)
            return True

        seqs = self._sequences(_requests(prompts, sampling_params, request_ids), live,
                               on_reject)
        try:
            self.engine.run(seqs, after_token)
        finally:
            bar.close()
        return [results[i] for i in sorted(results)]

    def _sequences(self, requests, live: dict[int, _Request], on_reject
                   ) -> Iterator[Sequence]:
        """Every request's samples, made as the engine pulls them. Sample ``k`` of a request
        draws from ``sample_seed(SamplingParams.seed, "", k)`` when the request has a seed,
        else from ``sample_seed(engine seed, request id, k)``: the same samples on a rerun,
        a resumed run or another plan, whatever the request's position."""
        eng = self.engine
        seq_id = 0
        for i, rid, prompt, p in requests:
            try:  # a rejected prompt's message names it by its index only if raised
                toks, max_tokens = self._admit("prompt" if on_reject else f"prompt {i}",
                                               prompt, p)
            except SeesawError as e:
                if on_reject is None:
                    raise
                on_reject(rid, str(e))
                continue
            live[i] = _Request(rid, prompt if isinstance(prompt, str) else None, toks,
                               [], p.n)
            base, key = (p.seed, "") if p.seed is not None else (self.seed, rid)
            for k in range(p.n):
                seq = Sequence(
                    seq_id=seq_id, request_index=i, sample_index=k, prompt_token_ids=toks,
                    params=p, seed=sample_seed(base, key, k), max_tokens=max_tokens,
                    replica=i % eng.plan.prefill.dp)
                live[i].samples.append(seq)
                seq_id += 1
                yield seq

    def _admit(self, label: str, prompt: PromptType, p: SamplingParams
               ) -> tuple[list[int], int]:
        """The prompt's tokens and its resolved ``max_tokens``, if it fits every cache."""
        eng = self.engine
        toks = self._tokens(label, prompt)
        if len(toks) >= eng.max_model_len:
            raise SeesawError(
                f"{label} has {len(toks)} tokens; the model's context is "
                f"{eng.max_model_len} (prompt + at least one generated token must fit)")
        max_tokens = min(p.max_tokens or eng.max_model_len, eng.max_model_len - len(toks))
        cap = eng.capacity_tokens()
        if len(toks) + max_tokens > cap:
            raise SeesawError(
                f"{label} needs up to {len(toks) + max_tokens} tokens of KV cache "
                f"(prompt {len(toks)} + max_tokens {max_tokens}) but the cache holds {cap}; "
                "raise cache.num_blocks / cache.kv_cache_gib or lower max_tokens")
        host, disk = eng.host_slots, eng.disk_slots
        if host and len(toks) + max_tokens - 1 > max(host, disk):
            holds = f"it holds {host}" + (f" and the disk tier {disk}" if disk else "")
            raise SeesawError(
                f"{label} needs up to {len(toks) + max_tokens - 1} token slots of the "
                f"host KV tier (prompt {len(toks)} + max_tokens {max_tokens} - 1, if "
                f"preempted) but {holds}; raise cache.host_kv_tokens / "
                "cache.host_kv_gib or lower max_tokens")
        return toks, max_tokens

    def _tokens(self, label: str, prompt: PromptType) -> list[int]:
        if isinstance(prompt, dict):
            toks = prompt.get("prompt_token_ids")
            if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
                raise SeesawError(f"{label}: 'prompt_token_ids' must be a list of ints")
            vocab = self.engine.model_cfg.vocab_size
            bad = [t for t in toks if not 0 <= t < vocab]
            if bad:
                raise SeesawError(f"{label}: token id {bad[0]} is outside the vocabulary "
                                  f"[0, {vocab})")
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise SeesawError(f"{label} is text but {self.engine.model_cfg.path} has no "
                                  "tokenizer; pass {'prompt_token_ids': [...]}")
            toks = self.tokenizer(prompt)["input_ids"] if prompt else []
        else:
            raise SeesawError(f"{label} must be a string or a dict with 'prompt_token_ids', "
                              f"got {type(prompt).__name__}")
        if not toks:
            raise SeesawError(f"{label} is empty")
        return list(toks)

    def _check_stop(self, seq: Sequence) -> bool:
        p, tok = seq.params, seq.output_token_ids[-1]
        reason = None
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids):
            reason = "stop"
        elif p.stop and self.tokenizer is not None:
            text = self.tokenizer.decode(seq.output_token_ids, skip_special_tokens=True)
            hits = [text.find(s) for s in p.stop if s in text]
            if hits:
                seq.stop_text_len, reason = min(hits), "stop"
        if reason is None and (len(seq.output_token_ids) >= seq.max_tokens
                               or seq.num_tokens >= self.engine.max_model_len):
            reason = "length"
        seq.finish_reason = reason
        return reason is not None

    def _request_output(self, req: _Request, start: float) -> RequestOutput:
        outs = []
        for s in req.samples:
            text = ""
            if self.tokenizer is not None:
                text = self.tokenizer.decode(s.output_token_ids, skip_special_tokens=True)
                if s.stop_text_len is not None:
                    text = text[: s.stop_text_len]
            outs.append(CompletionOutput(
                index=s.sample_index, text=text, token_ids=list(s.output_token_ids),
                finish_reason=s.finish_reason,
                logprobs=s.logprobs if s.params.logprobs is not None else None,
                num_preemptions=s.num_preemptions))
        return RequestOutput(
            request_id=req.id, prompt=req.prompt, prompt_token_ids=req.prompt_token_ids,
            outputs=outs, latency_s=time.perf_counter() - start)

    def shutdown(self) -> None:
        """Releases the host tier and destroys the process groups (the job can then exit
        cleanly)."""
        self.engine.shutdown()

    def close(self) -> None:
        """Releases the host tier but keeps the process groups, for another ``LLM`` in the
        same job."""
        self.engine.close()


@dataclass
class _Request:
    """A request being generated: what its output needs once every sample is done."""

    id: str
    prompt: str | None
    prompt_token_ids: list[int]
    samples: list[Sequence]  # in sample order
    unfinished: int


def _requests(prompts: Iterable[PromptType], sampling_params, request_ids
              ) -> Iterator[tuple[int, str, PromptType, SamplingParams]]:
    """``(index, id, prompt, params)`` per prompt, lazily; ``sampling_params`` and
    ``request_ids`` may be single values (params), sequences or iterators."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        params = itertools.repeat(sampling_params or SamplingParams())
    else:
        params = iter(sampling_params)
    ids = itertools.count() if request_ids is None else iter(request_ids)
    for i, prompt in enumerate(prompts):
        p, rid = next(params, None), next(ids, None)
        if p is None or rid is None:
            raise SeesawError(f"fewer {'SamplingParams' if p is None else 'request ids'} "
                              f"than prompts (prompt {i} has none)")
        if not isinstance(p, SamplingParams):
            raise SeesawError(f"prompt {i}: expected SamplingParams, got {type(p).__name__}")
        yield i, str(rid), prompt, p


def _load_tokenizer(path: str):
    if not os.path.exists(os.path.join(path, "tokenizer.json")) and not os.path.exists(
            os.path.join(path, "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _eos_ids(path: str, config_eos: tuple[int, ...], tokenizer) -> set[int]:
    ids = set(config_eos)
    gen = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen):
        with open(gen, encoding="utf-8") as f:
            eos = json.load(f).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else ([eos] if eos is not None else []))
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int | None, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True)
