"""What the cost model is asked about besides the model and the machine: the workload's mean
lengths (presets with sources) and the engine limits a job runs under."""

from __future__ import annotations

from dataclasses import dataclass

from seesaw_mcore.errors import SeesawError


@dataclass(frozen=True)
class Workload:
    """Mean prompt and output lengths, in tokens."""

    name: str
    prompt_len: float
    output_len: float


# sharegpt: ShareGPT conversations as in vLLM's evaluation (Kwon et al., SOSP 2023, "Efficient
# Memory Management for LLM Serving with PagedAttention", Fig. 11): mean input 161.31, mean
# output 337.99 tokens. arxiv: arXiv summarization (Cohan et al., NAACL 2018, Table 1: documents
# average 4,938 words, abstracts 220 words); at ~1.32 tokens per word an abstract is ~290 tokens
# and a document ~6,500, truncated so that prompt + output <= 4096: 3,806 + 290.
WORKLOADS = {
    "sharegpt": Workload("sharegpt", 161.31, 337.99),
    "arxiv": Workload("arxiv", 3806.0, 290.0),
}


@dataclass(frozen=True)
class EngineLimits:
    """The engine settings that bound a plan's batches (``SchedulerConfig`` and
    ``CacheConfig`` defaults unless a job sets them).

    Attributes:
        max_num_seqs: most sequences in one step.
        max_prefill_tokens: most prompt tokens in one prefill step; ``None``: what a
            throughput job would set (``CostModel.prefill_batch``).
        prefill_micro_batches: prefill micro-batches per pipeline stage.
        block_size: tokens per KV block (a sequence holds whole blocks).
        kv_cache_bytes: device KV budget per rank; ``None``: the memory the weights leave
            (``mem_gib x mem_utilization``).
        kv_blocks: device KV blocks per rank (``cache.num_blocks``), instead of a budget.
        host_tier_bytes: the node's host KV tier (``cache.host_kv_gib``; one per node);
            ``None``: the machine's host memory (``host_gib`` per rank).
        num_requests: the job's requests, when known (a replica never decodes more).
    """

    max_num_seqs: int = 256
    max_prefill_tokens: int | None = None
    prefill_micro_batches: int = 4
    block_size: int = 16
    kv_cache_bytes: float | None = None
    kv_blocks: int | None = None
    host_tier_bytes: float | None = None
    num_requests: int | None = None


def workload(name: str, prompt_len: float | None = None, output_len: float | None = None
             ) -> Workload:
    """A preset, or ``"PROMPT:OUTPUT"`` mean lengths (``"40:85"``), with either length
    overridden."""
    if name in WORKLOADS:
        wl = WORKLOADS[name]
    else:
        try:
            p, o = (float(x) for x in name.split(":"))
        except ValueError:
            raise SeesawError(f"unknown workload {name!r}; presets: {', '.join(WORKLOADS)}, "
                              "or mean lengths as PROMPT:OUTPUT (e.g. 40:85)") from None
        wl = Workload(name, p, o)
    if prompt_len is not None or output_len is not None:
        wl = Workload(f"{name} (custom)", prompt_len or wl.prompt_len,
                      output_len or wl.output_len)
    if wl.prompt_len < 1 or wl.output_len < 1:
        raise SeesawError("prompt and output lengths must be >= 1 token")
    return wl
