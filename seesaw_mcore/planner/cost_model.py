"""Plan chooser: the Seesaw paper's roofline cost model (Appendix A), calibrated with what a
step costs in software, ranks every valid ``(prefill, decode)`` layout pair for a model, a
machine and a workload.

    python -m seesaw_mcore.planner --model PATH/config.json --gpu a10 --num-gpus 8 \
        --workload arxiv [--json]

Per rank, a decoder layer on a micro-batch of ``m`` sequences with ``s`` new tokens each
costs ``max(weight bytes / HBM, linear FLOPs / peak) + max(KV bytes / attention bandwidth,
attention FLOPs / peak) + TP all-reduces + layer_s``: two ring all-reduces per layer,
``latency + 2 (TP-1)/TP x bytes / bandwidth`` each; ``layer_s`` is the layer's launch and
Python cost (``pp_layer_s`` on a pipeline stage).

A step of one replica costs ``step_s (+ tp_step_s under TP) + (micro-batches + PP - 1) x
stage + micro-batches x LM head``; a stage is its layers plus, under PP, one send/recv
(``p2p_latency_s + microbatch_s + bytes / bandwidth``). Decode runs PP micro-batches per step
at context ``prompt + output / 2``; prefill packs ``max_prefill_tokens`` of prompts into
``prefill_micro_batches x PP`` micro-batches. The decode batch is what the KV budget holds
(the configured one, or the memory the weights leave), in whole blocks, capped by
``max_num_seqs``, the job's requests per replica and, for a Seesaw pair, one fill of the host
tier.

A Seesaw pair pays two switches per fill of the host tier (``switch_s`` each, plus the
weights copied host -> device where a switch copies them); KV copies through the host link
run overlapped, so a phase takes at least its KV bytes over that link. Requests/s = ``1 /
(prompt / prefill tok/s + output / decode tok/s + switch cost per request)``; a static plan
is the pair with the same layout twice and no switches.

The software terms (``step_s``, ``tp_step_s``, ``layer_s``, ``pp_layer_s``, ``microbatch_s``,
``switch_s``, ``attn_gbs``) come from the ``measure`` profile's calibration
(``planner/calibrate.py``) or the presets' estimates (``planner/hardware.py``).
"""

from __future__ import annotations

import math

from seesaw_mcore.config import ParallelConfig, kv_bytes_per_token, layout_error
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.planner.hardware import GIB, PRESETS, Hardware
from seesaw_mcore.planner.shape import ModelShape
from seesaw_mcore.planner.workload import WORKLOADS, EngineLimits, Workload, workload

__all__ = ["GIB", "PRESETS", "WORKLOADS", "CostModel", "EngineLimits", "Hardware",
           "ModelShape", "Workload", "layouts", "workload"]


def layouts(world: int, experts: int = 0) -> list[ParallelConfig]:
    """Every ``DxTxP`` layout of ``world`` ranks, and for a model with ``experts`` the
    ``DxE`` layouts whose E divides them."""
    out = []
    for dp in range(1, world + 1):
        for tp in range(1, world // dp + 1):
            if world % (dp * tp) == 0:
                out.append(ParallelConfig(dp=dp, tp=tp, pp=world // (dp * tp)))
    for ep in range(2, world + 1):
        if experts and world % ep == 0 and experts % ep == 0:
            out.append(ParallelConfig(dp=world, ep=ep))
    return out


class CostModel:
    """Appendix-A roofline of one model on one machine, with its software costs.

    Args:
        shape: the model.
        hw: the per-rank hardware.
        limits: the engine's batching and cache limits (defaults: the engine's).
    """

    def __init__(self, shape: ModelShape, hw: Hardware,
                 limits: EngineLimits | None = None) -> None:
        self.shape, self.hw, self.limits = shape, hw, limits or EngineLimits()

    def weight_bytes(self, lay: ParallelConfig) -> float:
        """Weights of the fullest rank: a first stage with the embedding (with PP, the last
        stage's LM head is the same size; without, one stage holds both unless tied)."""
        s, b = self.shape, self.hw.dtype_bytes
        layers = math.ceil(s.num_layers / lay.pp)
        vocab = 1 if lay.pp > 1 or s.tie_word_embeddings else 2
        layer = s.dense_params + s.experts_per_layer * s.expert_params / lay.ep
        return (layers * layer + vocab * s.vocab_size * s.hidden_size) * b / lay.tp

    def kv_bytes_per_token(self, lay: ParallelConfig | None = None) -> float:
        """KV one rank holds per token (its layers, its KV heads); ``None``: the whole
        model's (a host-tier slot)."""
        s = self.shape
        return kv_bytes_per_token(s.num_layers, s.num_kv_heads, s.head_dim, self.hw.dtype_bytes,
                                  lay)

    def layer_time(self, lay: ParallelConfig, m: float, s: float, ctx: float,
                   prefill: bool) -> float:
        """Seconds for one rank to run one layer on ``m`` sequences of ``s`` new tokens
        attending over ``ctx`` tokens each (one micro-batch)."""
        sh, hw, tp = self.shape, self.hw, lay.tp
        b, bw, peak = hw.dtype_bytes, hw.mem_gbs * GIB, hw.tflops * 1e12
        tokens = m * s
        lin = self._linear_time(lay, tokens)
        hq, hkv, d = sh.num_heads / tp, sh.num_kv_heads / tp, sh.head_dim
        if prefill:  # write the new KV; causal attention over the prompt
            attn = max(2 * tokens * hkv * d * b / bw, 2 * m * s * s * hq * d / peak)
        else:  # read every cached token's KV at the attention kernel's bandwidth
            attn_bw = (hw.attn_gbs or hw.mem_gbs) * GIB
            attn = max(2 * m * ctx * hkv * d * b / attn_bw, 4 * m * ctx * hq * d / peak)
        net = 0.0
        if tp > 1:
            nbytes = tokens * sh.hidden_size * b
            net = 2 * (hw.allreduce_latency_s
                       + 2 * (tp - 1) / tp * nbytes / (hw.link_gbs(hw.allreduce_gbs, tp) * GIB))
        return lin + attn + net + (hw.pp_layer_s or hw.layer_s if lay.pp > 1 else hw.layer_s)

    def _linear_time(self, lay: ParallelConfig, tokens: float) -> float:
        """The layer's linears on ``tokens`` tokens of one rank (per rank, averaged over
        the layers): the dense part as a dense model's; for experts, the weights of those
        the tokens reach are read and only the routed ones compute. Under E, the E group's
        tokens meet at each expert's owner (all-to-all both ways of each routed row)."""
        sh, hw, tp = self.shape, self.hw, lay.tp
        b, bw, peak = hw.dtype_bytes, hw.mem_gbs * GIB, hw.tflops * 1e12
        dense = sh.dense_params / tp
        t = max(dense * b / bw, 2 * tokens * dense / peak)
        if not sh.moe_layers:
            return t
        share = sh.moe_layers / sh.num_layers  # MoE layers' share of a stage's layers
        pool = tokens * lay.ep  # the tokens every rank of the E group routes
        touched = sh.experts_touched(pool, sh.num_experts / lay.ep)  # of this rank's experts
        read = share * touched * sh.expert_params / tp * b
        flops = share * 2 * pool * sh.experts_per_tok / lay.ep * sh.expert_params / tp
        t += max(read / bw, flops / peak)
        if lay.ep > 1:  # each routed row out and back: all-to-all within the E group
            rows = tokens * sh.experts_per_tok * (lay.ep - 1) / lay.ep
            t += share * 2 * (hw.allreduce_latency_s
                              + rows * sh.hidden_size * b
                              / (hw.link_gbs(hw.allreduce_gbs, lay.ep) * GIB))
        return t

    def head_time(self, lay: ParallelConfig, rows: float) -> float:
        """The LM head (vocab-parallel under TP) on ``rows`` positions of one micro-batch."""
        sh, hw = self.shape, self.hw
        w = sh.vocab_size * sh.hidden_size / lay.tp
        return max(w * hw.dtype_bytes / (hw.mem_gbs * GIB), 2 * rows * w / (hw.tflops * 1e12))

    def send_time(self, tokens: float, lay: ParallelConfig | None = None) -> float:
        """One micro-batch's hidden states from one stage to the next. Stages are the
        outermost rank dimension, so a pipeline over more ranks than a domain has a
        boundary between domains, which paces the pipeline."""
        hw = self.hw
        span = lay.world_size if lay is not None else 1
        return (hw.p2p_latency_s + hw.microbatch_s + tokens * self.shape.hidden_size
                * hw.dtype_bytes / (hw.link_gbs(hw.p2p_gbs, span) * GIB))

    def step_time(self, lay: ParallelConfig, mbs: int, m: float, s: float, ctx: float,
                  prefill: bool) -> float:
        """One replica's step: ``mbs`` micro-batches of ``m`` sequences (``s`` new tokens
        each) through ``PP`` stages, plus the fixed costs."""
        hw = self.hw
        layers = math.ceil(self.shape.num_layers / lay.pp)
        stage = layers * self.layer_time(lay, m, s, ctx, prefill)
        if lay.pp > 1:
            stage += self.send_time(m * s, lay)
        return (hw.step_s + (hw.tp_step_s if lay.tp > 1 else 0.0) + (mbs + lay.pp - 1) * stage
                + mbs * self.head_time(lay, m))

    def prefill_batch(self, lay: ParallelConfig, wl: Workload) -> int:
        """Prompts per replica step: ``max_prefill_tokens`` worth (at least one), at most
        ``max_num_seqs``, the job's requests per replica and what the KV budget holds.
        Without a job's limit, a step
        packs 4,096 tokens or, under PP, at least one prompt per micro-batch (a long-prompt
        job raises ``scheduler.max_prefill_tokens`` so that PP prefill pipelines)."""
        lim = self.limits
        if lim.max_prefill_tokens is None:  # as a throughput job sets it: every micro-batch
            tokens = max(4096, lim.prefill_micro_batches * lay.pp * wl.prompt_len)  # a prompt
        else:
            tokens = lim.max_prefill_tokens
        b = max(int(tokens // wl.prompt_len), 1)
        fit = self.kv_budget(lay) // (self.kv_bytes_per_token(lay) * self._rounded(wl.prompt_len))
        return int(max(min(b, lim.max_num_seqs, self._per_replica(lay), fit), 1))

    def _rounded(self, tokens: float) -> int:
        """``tokens`` in whole KV blocks."""
        bs = self.limits.block_size
        return math.ceil(tokens / bs) * bs

    def prefill_tps(self, lay: ParallelConfig, wl: Workload) -> float:
        """Prompt tokens per second of every replica together."""
        s, b = wl.prompt_len, self.prefill_batch(lay, wl)
        parts = self.limits.prefill_micro_batches * lay.pp if lay.pp > 1 else 1
        mbs = min(parts, b)
        return lay.dp * b * s / self.step_time(lay, mbs, b / mbs, s, s, True)

    def kv_budget(self, lay: ParallelConfig) -> float:
        """Device KV bytes per rank under ``lay``."""
        if self.limits.kv_blocks is not None:
            return self.limits.kv_blocks * self.limits.block_size * self.kv_bytes_per_token(lay)
        if self.limits.kv_cache_bytes is not None:
            return self.limits.kv_cache_bytes
        hw = self.hw
        return hw.mem_gib * GIB * hw.mem_utilization - self.weight_bytes(lay)

    def decode_batch(self, lay: ParallelConfig, wl: Workload) -> int:
        """Sequences one replica decodes at once: what the KV budget holds at the mean
        context (prompt + half the output) in whole blocks, at most ``max_num_seqs`` and
        the job's requests per replica."""
        ctx = self._rounded(wl.prompt_len + wl.output_len / 2)
        n = max(self.kv_budget(lay), 0) // (self.kv_bytes_per_token(lay) * ctx)
        return int(min(n, self.limits.max_num_seqs, self._per_replica(lay)))

    def _per_replica(self, lay: ParallelConfig) -> float:
        n = self.limits.num_requests
        return math.inf if n is None else math.ceil(n / lay.dp)

    def decode_tps(self, lay: ParallelConfig, wl: Workload, batch: float) -> float:
        """Generated tokens per second of every replica together at ``batch`` per replica."""
        ctx = wl.prompt_len + wl.output_len / 2
        mbs = int(min(lay.pp, max(batch, 1))) if lay.pp > 1 else 1
        return lay.dp * batch / self.step_time(lay, mbs, batch / mbs, 1, ctx, False)

    def requests_per_fill(self, wl: Workload, world: int) -> float:
        """Requests one fill of the host tier holds (a Seesaw pair switches twice per fill)."""
        lim = self.limits
        tier = (lim.host_tier_bytes if lim.host_tier_bytes is not None
                else self.hw.host_gib * GIB * world)
        n = max(tier / (self.kv_bytes_per_token() * (wl.prompt_len + wl.output_len)), 1.0)
        return min(n, lim.num_requests) if lim.num_requests is not None else n

    def switch_time(self, dst: ParallelConfig) -> float:
        """One switch into ``dst``: its fixed cost and, where a switch copies weights, the
        new layout's weights over the host link."""
        hw = self.hw
        copy = self.weight_bytes(dst) / (hw.host_link_gbs * GIB) if hw.switch_copies_weights \
            else 0.0
        return hw.switch_s + copy

    def predict(self, prefill: ParallelConfig, decode: ParallelConfig, wl: Workload,
                prefill_tps: float | None = None, decode_tps: float | None = None
                ) -> dict | None:
        """The pair's predicted throughput, or ``None`` when it is not a valid plan.

        Args:
            prefill_tps / decode_tps: measured phase rates (every replica together; decode
                at this model's decode batch) to use instead of the model's.
        """
        sh = self.shape
        for lay in (prefill, decode):
            if layout_error(lay, sh.num_heads, sh.num_kv_heads, sh.intermediate_size,
                            sh.num_layers):
                return None
        world, seesaw = prefill.world_size, prefill != decode
        batch = self.decode_batch(decode, wl)
        per_fill = self.requests_per_fill(wl, world) if seesaw else math.inf
        if seesaw:  # a decode phase holds one fill of the host tier
            batch = int(min(batch, math.ceil(per_fill / decode.dp)))
        prompt = self._rounded(wl.prompt_len) * self.kv_bytes_per_token(prefill)
        if batch < 1 or self.kv_budget(prefill) < prompt:  # a prompt must fit to prefill
            return None
        p_tps = prefill_tps or self.prefill_tps(prefill, wl)
        d_tps = decode_tps or self.decode_tps(decode, wl, batch)
        t_prefill, t_decode = wl.prompt_len / p_tps, wl.output_len / d_tps
        switch = 0.0
        if seesaw:
            link = self.hw.host_link_gbs * GIB
            kv_req = self.kv_bytes_per_token() * (wl.prompt_len + wl.output_len)
            t_prefill = max(t_prefill, kv_req / (world * link))  # KV out, overlapped
            t_decode = max(t_decode, kv_req / (world * link))  # KV back in, overlapped
            switch = (self.switch_time(prefill) + self.switch_time(decode)) / per_fill
        rps = 1 / (t_prefill + t_decode + switch)
        return {"prefill": str(prefill), "decode": str(decode),
                "requests_per_s": rps,
                "tokens_per_s": rps * (wl.prompt_len + wl.output_len),
                "prefill_tokens_per_s": p_tps, "decode_tokens_per_s": d_tps,
                "prefill_batch": self.prefill_batch(prefill, wl), "decode_batch": batch}

    def rank(self, world: int, wl: Workload) -> list[dict]:
        """Every valid pair with the same DP in both phases (an E group counting as one
        replica: ``E2:T2``), best first.

        Raises:
            SeesawError: when no layout of ``world`` ranks holds the model.
        """
        rows = []
        candidates = layouts(world, self.shape.num_experts)
        for p in candidates:
            for d in candidates:
                if p.dp // p.ep == d.dp // d.ep:  # E's replicas regroup (E2:T2)
                    row = self.predict(p, d, wl)
                    if row is not None:
                        rows.append(row)
        if not rows and any(self.kv_budget(lay) > 0 for lay in candidates):
            ctx = wl.prompt_len + wl.output_len / 2
            raise SeesawError(
                f"no layout's KV cache holds one sequence of workload {wl.name} (mean context "
                f"{ctx:g} tokens); give the job's lengths as workload=PROMPT:OUTPUT or raise "
                "the KV cache")
        if not rows:
            raise SeesawError(
                f"the model ({self.shape.params * self.hw.dtype_bytes / GIB:.1f} GiB of "
                f"weights) fits no layout of {world} x {self.hw.name} "
                f"({self.hw.mem_gib:g} GiB each): no layout leaves room for its KV cache")
        rows.sort(key=lambda r: -r["tokens_per_s"])
        return rows
