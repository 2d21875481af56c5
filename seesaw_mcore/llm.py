"""vLLM-style offline API: ``LLM(model=DIR).generate(prompts, SamplingParams(...))``.

SPMD: every rank constructs ``LLM`` and calls ``generate`` with the same arguments; rank 0
gets the ``RequestOutput`` list (in input order), other ranks get ``[]``. With one rank it
runs in a plain ``python`` process.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence as Seq

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
        prompts: PromptType | Seq[PromptType],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = True,
        on_output: Callable[[RequestOutput], None] | None = None,
        request_ids: Seq[str] | None = None,
    ) -> list[RequestOutput]:
        """Generates completions for every prompt.

        Args:
            prompts: strings or ``{"prompt_token_ids": [...]}`` dicts.
            sampling_params: one for all prompts, or one per prompt (default: vLLM's).
            use_tqdm: show a progress bar on rank 0.
            on_output: called on rank 0 with each ``RequestOutput`` as it finishes.
            request_ids: ids for the outputs (default ``"0"``, ``"1"``, ...).

        Returns:
            On rank 0, one ``RequestOutput`` per prompt in input order; ``[]`` elsewhere.
        """
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        params = _per_prompt(sampling_params, len(prompts))
        ids = [str(i) for i in range(len(prompts))] if request_ids is None else list(request_ids)
        if not self.is_driver:
            self.engine.run([], lambda s: False)
            return []
        try:
            seqs, token_lists = self._make_sequences(prompts, params, ids)
        except SeesawError as e:
            self.engine.abort(str(e))
            raise
        start = time.perf_counter()
        results: dict[int, RequestOutput] = {}
        samples: list[list[Sequence]] = [[] for _ in prompts]  # per request, in sample order
        for s in seqs:
            samples[s.request_index].append(s)
        bar = _progress(len(prompts), use_tqdm)

        def after_token(seq: Sequence) -> bool:
            if not self._check_stop(seq):
                return False
            i = seq.request_index
            if all(s.finish_reason is not None for s in samples[i]):
                out = self._request_output(ids[i], prompts[i], token_lists[i], samples[i], start)
                results[i] = out
                bar.update(1)
                if on_output is not None:
                    on_output(out)
            return True

        try:
            self.engine.run(seqs, after_token)
        finally:
            bar.close()
        return [results[i] for i in range(len(prompts))]

    def _make_sequences(self, prompts, params, ids
                        ) -> tuple[list[Sequence], list[list[int]]]:
        """Sequences of every prompt's samples. Sample ``k`` of a request draws from
        ``sample_seed(SamplingParams.seed, "", k)`` when the request has a seed, else from
        ``sample_seed(engine seed, request id, k)``: the same samples on a rerun, a resumed
        run or another plan, whatever the request's position."""
        eng = self.engine
        seqs, token_lists = [], []
        cap = eng.capacity_tokens()
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            toks = self._tokens(i, prompt)
            if len(toks) >= eng.max_model_len:
                raise SeesawError(
                    f"prompt {i} has {len(toks)} tokens; the model's context is "
                    f"{eng.max_model_len} (prompt + at least one generated token must fit)")
            max_tokens = min(p.max_tokens or eng.max_model_len, eng.max_model_len - len(toks))
            if len(toks) + max_tokens > cap:
                raise SeesawError(
                    f"prompt {i} needs up to {len(toks) + max_tokens} tokens of KV cache "
                    f"(prompt {len(toks)} + max_tokens {max_tokens}) but the cache holds {cap}; "
                    "raise cache.num_blocks / cache.kv_cache_gib or lower max_tokens")
            host, disk = eng.host_slots, eng.disk_slots
            if host and len(toks) + max_tokens - 1 > max(host, disk):
                holds = f"it holds {host}" + (f" and the disk tier {disk}" if disk else "")
                raise SeesawError(
                    f"prompt {i} needs up to {len(toks) + max_tokens - 1} token slots of the "
                    f"host KV tier (prompt {len(toks)} + max_tokens {max_tokens} - 1, if "
                    f"preempted) but {holds}; raise cache.host_kv_tokens / "
                    "cache.host_kv_gib or lower max_tokens")
            token_lists.append(toks)
            base, rid = (p.seed, "") if p.seed is not None else (self.seed, ids[i])
            for k in range(p.n):
                seqs.append(Sequence(
                    seq_id=len(seqs), request_index=i, sample_index=k, prompt_token_ids=toks,
                    params=p, seed=sample_seed(base, rid, k), max_tokens=max_tokens,
                    replica=i % eng.plan.prefill.dp))
        return seqs, token_lists

    def _tokens(self, i: int, prompt: PromptType) -> list[int]:
        if isinstance(prompt, dict):
            toks = prompt.get("prompt_token_ids")
            if not isinstance(toks, list) or not all(isinstance(t, int) for t in toks):
                raise SeesawError(f"prompt {i}: 'prompt_token_ids' must be a list of ints")
            vocab = self.engine.model_cfg.vocab_size
            bad = [t for t in toks if not 0 <= t < vocab]
            if bad:
                raise SeesawError(f"prompt {i}: token id {bad[0]} is outside the vocabulary "
                                  f"[0, {vocab})")
        elif isinstance(prompt, str):
            if self.tokenizer is None:
                raise SeesawError(f"prompt {i} is text but {self.engine.model_cfg.path} has no "
                                  "tokenizer; pass {'prompt_token_ids': [...]}")
            toks = self.tokenizer(prompt)["input_ids"] if prompt else []
        else:
            raise SeesawError(f"prompt {i} must be a string or a dict with 'prompt_token_ids', "
                              f"got {type(prompt).__name__}")
        if not toks:
            raise SeesawError(f"prompt {i} is empty")
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

    def _request_output(self, rid, prompt, toks, seqs, start) -> RequestOutput:
        outs = []
        for s in seqs:
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
            request_id=rid, prompt=prompt if isinstance(prompt, str) else None,
            prompt_token_ids=toks, outputs=outs, latency_s=time.perf_counter() - start)

    def shutdown(self) -> None:
        """Releases the host tier and destroys the process groups (the job can then exit
        cleanly)."""
        self.engine.shutdown()

    def close(self) -> None:
        """Releases the host tier but keeps the process groups, for another ``LLM`` in the
        same job."""
        self.engine.close()


def _per_prompt(sp, n: int) -> list[SamplingParams]:
    if sp is None:
        return [SamplingParams()] * n
    if isinstance(sp, SamplingParams):
        return [sp] * n
    sp = list(sp)
    if len(sp) != n:
        raise SeesawError(f"got {len(sp)} SamplingParams for {n} prompts")
    return sp


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


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc="requests", unit="req", dynamic_ncols=True)
