"""Plan chooser: the Seesaw paper's roofline cost model (Appendix A) ranks every valid
``(prefill, decode)`` layout pair for a model, a machine and a workload.

    python -m seesaw_mcore.planner --model PATH/config.json --gpu a10 --num-gpus 8 \
        --workload arxiv [--json]

Per rank and layer, a micro-batch of ``m`` sequences with ``s`` new tokens each costs
``max(weight bytes / HBM, linear FLOPs / peak) + max(KV bytes / HBM, attention FLOPs / peak)
+ TP all-reduce`` (two per layer, ring: ``2 (TP-1)/TP x bytes / bandwidth``); the linear part
and the all-reduce shrink with TP, the per-token work with DP x TP x PP. Decode runs PP
micro-batches per step (each stage re-reads its weights once per micro-batch); prefill runs
``4 x PP`` micro-batches with a ``PP - 1`` bubble (a step packs ``max_prefill_tokens`` of
prompts, and at least one prompt per micro-batch). The decode batch is what the KV memory left
after the weights holds (capped at 256). A Seesaw pair adds, per fill of the host KV tier, the
weights copied host -> device at its two switches; KV copies through the host link run
overlapped, so a phase takes at least its KV bytes over that link. Requests/s =
``1 / (prompt / prefill tok/s + output / decode tok/s + switches per request)``; a static plan
is the pair with the same layout twice and no switches.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from seesaw_mcore.config import ParallelConfig, kv_bytes_per_token, layout_error
from seesaw_mcore.errors import SeesawError

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or CPU rank) and its links; bandwidths in GiB/s.

    Attributes:
        name: preset name or ``measured``.
        mem_gib: device memory per rank for weights and KV.
        mem_gbs: memory bandwidth.
        tflops: dense matmul throughput at the model's dtype.
        allreduce_gbs: all-reduce bus bandwidth between ranks.
        p2p_gbs: send/recv bandwidth between pipeline neighbours.
        host_link_gbs: host <-> device (weights reloaded at a switch, KV to the host tier).
        host_gib: host memory per rank for the host KV tier.
        dtype_bytes: bytes per weight / KV element.
        allreduce_latency_s / p2p_latency_s: fixed cost per operation (0 in the paper's
            model; measured profiles carry theirs).
        mem_utilization: share of ``mem_gib`` the engine may use.
    """

    name: str
    mem_gib: float
    mem_gbs: float
    tflops: float
    allreduce_gbs: float
    p2p_gbs: float
    host_link_gbs: float
    host_gib: float = 80.0
    dtype_bytes: int = 2
    allreduce_latency_s: float = 0.0
    p2p_latency_s: float = 0.0
    mem_utilization: float = 0.9


# The paper's Table 1, per GPU, fp16. No NVLink on A10/L4: all-reduce and send/recv go over
# PCIe 4.0 x8; A100 (SXM, 40 GiB) all-reduces over NVLink and reaches the host over PCIe 4.0
# x16 (32 GiB/s, our figure: the table gives only NVLink).
PRESETS = {
    "a10": Hardware("a10", 24, 600, 125, 16, 16, 16),
    "l4": Hardware("l4", 24, 300, 121, 16, 16, 16),
    "a100": Hardware("a100", 40, 1555, 312, 600, 600, 32),
}


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

MAX_DECODE_BATCH = 256  # SchedulerConfig.max_num_seqs
PREFILL_TOKENS = 4096  # SchedulerConfig.max_prefill_tokens
PREFILL_MICRO_BATCHES = 4  # per stage: SchedulerConfig.prefill_micro_batches


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs from an HF ``config.json``."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, path: str) -> "ModelShape":
        """Reads ``path`` (a ``config.json`` or the folder holding it)."""
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise SeesawError(f"cannot read model config {path}: {e}") from None
        try:
            heads = int(raw["num_attention_heads"])
            hidden = int(raw["hidden_size"])
            return cls(int(raw["num_hidden_layers"]), hidden, int(raw["intermediate_size"]),
                       heads, int(raw.get("num_key_value_heads") or heads),
                       int(raw.get("head_dim") or hidden // heads), int(raw["vocab_size"]),
                       bool(raw.get("tie_word_embeddings", False)))
        except KeyError as e:
            raise SeesawError(f"model config {path} has no {e.args[0]}") from None

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention projections + SwiGLU MLP)."""
        h, d = self.hidden_size, self.head_dim
        attn = h * (self.num_heads + 2 * self.num_kv_heads) * d + self.num_heads * d * h
        return attn + 3 * h * self.intermediate_size

    @property
    def params(self) -> int:
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_params + embed


def layouts(world: int) -> list[ParallelConfig]:
    """Every ``DxTxP`` layout of ``world`` ranks."""
    out = []
    for dp in range(1, world + 1):
        for tp in range(1, world // dp + 1):
            if world % (dp * tp) == 0:
                out.append(ParallelConfig(dp=dp, tp=tp, pp=world // (dp * tp)))
    return out


class CostModel:
    """Appendix-A roofline of one model on one machine.

    Args:
        shape: the model.
        hw: the per-rank hardware.
    """

    def __init__(self, shape: ModelShape, hw: Hardware) -> None:
        self.shape, self.hw = shape, hw

    def weight_bytes(self, lay: ParallelConfig) -> float:
        """Weights of the fullest rank: a first stage with the embedding (with PP, the last
        stage's LM head is the same size; without, one stage holds both unless tied)."""
        s, b = self.shape, self.hw.dtype_bytes
        layers = math.ceil(s.num_layers / lay.pp)
        vocab = 1 if lay.pp > 1 or s.tie_word_embeddings else 2
        return (layers * s.layer_params + vocab * s.vocab_size * s.hidden_size) * b / lay.tp

    def kv_bytes_per_token(self, lay: ParallelConfig) -> float:
        """KV one rank holds per token (its layers, its KV heads)."""
        s = self.shape
        return kv_bytes_per_token(s.num_layers, s.num_kv_heads, s.head_dim, self.hw.dtype_bytes,
                                  lay)

    def layer_time(self, lay: ParallelConfig, m: float, s: float, ctx: float,
                   prefill: bool) -> float:
        """Seconds for one rank to run one layer on ``m`` sequences of ``s`` new tokens
        attending over ``ctx`` tokens each."""
        sh, hw, tp = self.shape, self.hw, lay.tp
        b, bw, peak = hw.dtype_bytes, hw.mem_gbs * GIB, hw.tflops * 1e12
        tokens = m * s
        w = sh.layer_params / tp
        lin = max(w * b / bw, 2 * tokens * w / peak)
        hq, hkv, d = sh.num_heads / tp, sh.num_kv_heads / tp, sh.head_dim
        if prefill:  # write the new KV; causal attention over the prompt
            kv, flops = 2 * tokens * hkv * d * b, 2 * m * s * s * hq * d
        else:  # read every cached token's KV
            kv, flops = 2 * m * ctx * hkv * d * b, 4 * m * ctx * hq * d
        attn = max(kv / bw, flops / peak)
        net = 0.0
        if tp > 1:
            nbytes = tokens * sh.hidden_size * b
            net = 2 * (hw.allreduce_latency_s
                       + 2 * (tp - 1) / tp * nbytes / (hw.allreduce_gbs * GIB))
        return lin + attn + net

    def _send(self, tokens: float) -> float:
        hw = self.hw
        return hw.p2p_latency_s + tokens * self.shape.hidden_size * hw.dtype_bytes / (
            hw.p2p_gbs * GIB)

    def prefill_batch(self, lay: ParallelConfig, wl: Workload) -> int:
        """Prompts per replica step: ``max_prefill_tokens`` worth, and at least enough for
        ``4 x PP`` micro-batches (long prompts: raise ``scheduler.max_prefill_tokens`` to
        ``batch x prompt``), as a throughput job would run."""
        return int(max(PREFILL_TOKENS // wl.prompt_len, PREFILL_MICRO_BATCHES * lay.pp
                       if lay.pp > 1 else 1))

    def prefill_tps(self, lay: ParallelConfig, wl: Workload) -> float:
        """Prompt tokens per second of every replica together."""
        s = wl.prompt_len
        b = self.prefill_batch(lay, wl)
        mbs = min(PREFILL_MICRO_BATCHES * lay.pp, b) if lay.pp > 1 else 1
        per_stage = (math.ceil(self.shape.num_layers / lay.pp)
                     * self.layer_time(lay, b / mbs, s, s, True)
                     + (self._send(b / mbs * s) if lay.pp > 1 else 0.0))
        step = (mbs + lay.pp - 1) * per_stage
        return lay.dp * b * s / step

    def decode_batch(self, lay: ParallelConfig, wl: Workload) -> int:
        """Sequences one replica decodes at once: what the KV memory after the weights
        holds at the mean context (prompt + half the output)."""
        hw = self.hw
        free = hw.mem_gib * GIB * hw.mem_utilization - self.weight_bytes(lay)
        ctx = wl.prompt_len + wl.output_len / 2
        return int(min(max(free, 0) // (self.kv_bytes_per_token(lay) * ctx), MAX_DECODE_BATCH))

    def decode_tps(self, lay: ParallelConfig, wl: Workload, batch: int) -> float:
        """Generated tokens per second of every replica together at ``batch`` per replica."""
        ctx = wl.prompt_len + wl.output_len / 2
        m = batch / lay.pp  # PP micro-batches per step
        step = (self.shape.num_layers * self.layer_time(lay, m, 1, ctx, False)
                + (lay.pp * self._send(m) if lay.pp > 1 else 0.0))
        return lay.dp * batch / step

    def predict(self, prefill: ParallelConfig, decode: ParallelConfig, wl: Workload
                ) -> dict | None:
        """The pair's predicted throughput, or ``None`` when it is not a valid plan."""
        sh, hw = self.shape, self.hw
        for lay in (prefill, decode):
            if layout_error(lay, sh.num_heads, sh.num_kv_heads, sh.intermediate_size,
                            sh.num_layers):
                return None
        batch = self.decode_batch(decode, wl)
        room = hw.mem_gib * GIB * hw.mem_utilization - self.weight_bytes(prefill)
        scratch = (self.prefill_batch(prefill, wl) * wl.prompt_len
                   * self.kv_bytes_per_token(prefill))
        if batch < 1 or room < scratch:
            return None
        world = prefill.world_size
        p_tps = self.prefill_tps(prefill, wl)
        d_tps = self.decode_tps(decode, wl, batch)
        t_prefill, t_decode = wl.prompt_len / p_tps, wl.output_len / d_tps
        switch = 0.0
        if prefill != decode:
            link = hw.host_link_gbs * GIB
            kv_req = (2 * sh.num_layers * sh.num_kv_heads * sh.head_dim * hw.dtype_bytes
                      * (wl.prompt_len + wl.output_len))
            t_prefill = max(t_prefill, kv_req / (world * link))  # KV out, overlapped
            t_decode = max(t_decode, kv_req / (world * link))  # KV back in, overlapped
            per_fill = hw.host_gib * GIB * world / kv_req  # requests per host-tier fill
            reload = (self.weight_bytes(prefill) + self.weight_bytes(decode)) / link
            switch = reload / max(per_fill, 1)
        rps = 1 / (t_prefill + t_decode + switch)
        return {"prefill": str(prefill), "decode": str(decode),
                "requests_per_s": rps,
                "tokens_per_s": rps * (wl.prompt_len + wl.output_len),
                "prefill_tokens_per_s": p_tps, "decode_tokens_per_s": d_tps,
                "prefill_batch": self.prefill_batch(prefill, wl), "decode_batch": batch}

    def rank(self, world: int, wl: Workload) -> list[dict]:
        """Every valid pair with the same DP in both phases, best first.

        Raises:
            SeesawError: when no layout of ``world`` ranks holds the model.
        """
        rows = []
        for p in layouts(world):
            for d in layouts(world):
                if p.dp == d.dp:
                    row = self.predict(p, d, wl)
                    if row is not None:
                        rows.append(row)
        if not rows:
            raise SeesawError(
                f"the model ({self.shape.params * self.hw.dtype_bytes / GIB:.1f} GiB of "
                f"weights) fits no layout of {world} x {self.hw.name} "
                f"({self.hw.mem_gib:g} GiB each): no layout leaves room for its KV cache")
        rows.sort(key=lambda r: -r["tokens_per_s"])
        return rows


def workload(name: str, prompt_len: float | None = None, output_len: float | None = None
             ) -> Workload:
    """A preset, with either length overridden."""
    if name not in WORKLOADS:
        raise SeesawError(f"unknown workload {name!r}; presets: {', '.join(WORKLOADS)}")
    wl = WORKLOADS[name]
    if prompt_len is not None or output_len is not None:
        wl = Workload(f"{name} (custom)", prompt_len or wl.prompt_len,
                      output_len or wl.output_len)
    if wl.prompt_len < 1 or wl.output_len < 1:
        raise SeesawError("prompt and output lengths must be >= 1 token")
    return wl
