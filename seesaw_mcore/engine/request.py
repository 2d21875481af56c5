"""Sequences: one completion of one prompt, with its token accounting."""

from __future__ import annotations

import enum
import hashlib
import time
from dataclasses import dataclass, field

from seesaw_mcore.sampling_params import SamplingParams


class SeqStatus(str, enum.Enum):
    """Where a sequence is in its life."""

    WAITING = "waiting"  # needs (re)prefill: no KV on the device
    RUNNING = "running"  # KV on the device, decoding
    OFFLOADED = "offloaded"  # prefilled; KV in a tier (host or disk), waiting for decode
    FINISHED = "finished"


@dataclass
class Sequence:
    """One completion (``sample_index`` of ``n``) of the prompt at ``request_index``."""

    seq_id: int
    request_index: int  # position of the prompt in the input (output order)
    sample_index: int  # 0 .. n-1
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # resolved sampling seed of this completion
    max_tokens: int  # resolved: never past the model context
    replica: int = 0  # DP replica that owns it
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)  # per token, if asked
    cumulative_logprob: float = 0.0  # of the sampled tokens (with logprobs)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # first prefill, if asked
    block_table: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None  # "stop" or "length" once finished
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    lora: int = 0  # its LoRA adapter's index (0: the base model)
    lora_key: str | None = None  # the adapter's prefix-cache key (``engine/adapters.py``)
    # ids that cannot end it before ``params.min_tokens`` (stop token ids, EOS): set on add
    min_tokens_banned: tuple[int, ...] = ()
    # prefix caching: chain hashes of its full blocks so far (``kv.block_pool.block_hashes``)
    block_hashes: list[bytes] = field(default_factory=list)
    hash_root: bytes = b""  # the chain's root (``kv.block_pool.cache_root``): set on add
    num_cached_tokens: int = 0  # prompt tokens its first prefill took from the prefix cache
    arrival: float = field(default_factory=time.monotonic)  # when it was made (waiting bound)
    # routed experts (``engine/routed.py``): [rows, MoE layers, top_k] int16 by position, and
    # how many leading positions are written
    routed: object = field(default=None, repr=False, compare=False)
    routed_filled: int = 0
    _all: list[int] | None = field(default=None, repr=False, compare=False)
    # its sampling spec's fields but the per-step ones (``batching.scheduled``), made once
    spec_base: object = field(default=None, repr=False, compare=False)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + completion ids: one list kept up to date as the completion grows (no
        copy per step; callers must not change it)."""
        allt = self._all
        if allt is None:
            allt = self._all = list(self.prompt_token_ids)
        done = len(allt) - len(self.prompt_token_ids)
        if done < len(self.output_token_ids):
            allt.extend(self.output_token_ids[done:])
        return allt


def make_samples(first_seq_id: int, index: int, request_id: str, prompt_token_ids: list[int],
                 params: SamplingParams, max_tokens: int, engine_seed: int) -> list[Sequence]:
    """A request's ``n`` sequences, ids from ``first_seq_id``. Sample ``k`` draws from
    ``sample_seed(params.seed, "", k)`` when the request has a seed, else from
    ``sample_seed(engine_seed, request_id, k)``: the same samples on a rerun, a resumed run,
    another plan or another arrival time, whatever the request's position."""
    base, key = (params.seed, "") if params.seed is not None else (engine_seed, request_id)
    return [Sequence(seq_id=first_seq_id + k, request_index=index, sample_index=k,
                     prompt_token_ids=prompt_token_ids, params=params,
                     seed=sample_seed(base, key, k), max_tokens=max_tokens)
            for k in range(params.n)]


def sample_seed(seed: int, request_id: str, sample: int) -> int:
    """A 63-bit seed from ``(seed, request id, sample index)``, stable across runs and
    machines (BLAKE2b, not Python's salted ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\x00{request_id}\x00{sample}".encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1


@dataclass
class Logprob:
    """One token's logprob, shaped like vLLM's (``vllm.sequence.Logprob``)."""

    logprob: float  # of the model's raw distribution (before temperature and filters)
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None  # the token's text


@dataclass
class CompletionOutput:
    """One completion, shaped like vLLM's (same fields, same order)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None  # sum of the sampled tokens' logprobs, if asked
    logprobs: list[dict[int, Logprob]] | None = None  # per token: sampled + top-k, if asked
    finish_reason: str | None = None  # "stop" (EOS, stop token or stop string) or "length"
    stop_reason: int | str | None = None  # the stop token id or string; None for EOS/length
    num_preemptions: int = 0
    # with enable_return_routed_experts: [prompt + generated - 1, MoE layers, top_k] int16,
    # the experts each MoE layer chose for every token fed (final outputs)
    routed_experts: object = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """All completions of one prompt, shaped like vLLM's (same fields, same order)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    # per prompt position: None for the first, else {actual token and top-k: Logprob}
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held (vLLM's; first sample)
    latency_s: float = 0.0  # from generate() start to this request's last token
