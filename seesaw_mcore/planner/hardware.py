"""The machines the cost model knows: ``Hardware`` (one rank and its links, hardware and
software costs) and the GPU presets, each with its sources.

A preset's hardware figures are datasheet numbers. Its software figures (what a step, a layer
and a pipeline micro-batch cost besides their bytes and FLOPs) are estimates for eager PyTorch
on a GPU: the ``measure`` profile replaces every figure by this machine's own
(``planner/profile.py``), software costs included.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30


@dataclass(frozen=True)
class Hardware:
    """One accelerator (or CPU rank) and its links; bandwidths in GiB/s, times in seconds.

    Attributes:
        name: preset name or ``measured (...)``.
        mem_gib: device memory per rank for weights and KV.
        mem_gbs: memory bandwidth.
        tflops: dense matmul throughput at the model's dtype.
        allreduce_gbs: all-reduce bus bandwidth between ranks.
        p2p_gbs: send/recv bandwidth between pipeline neighbours.
        host_link_gbs: host <-> device (weights reloaded at a switch, KV to the host tier).
        host_gib: host memory per rank.
        dtype_bytes: bytes per weight / KV element.
        allreduce_latency_s: fixed cost of one TP all-reduce (two per layer).
        p2p_latency_s: fixed cost of one send/recv between pipeline stages.
        mem_utilization: share of ``mem_gib`` the engine may use.
        attn_gbs: KV bytes per second decode attention reads (its own kernel, at the
            workload's context lengths); 0: ``mem_gbs``.
        step_s: fixed cost of one engine step of one replica: scheduling, the step plan's
            broadcast, batch metadata, sampling, the tokens' way back to rank 0.
        tp_step_s: what a step under TP > 1 adds (the embedding's all-reduce, the LM head's
            gather for sampling).
        layer_s: fixed cost of one decoder layer on one micro-batch (kernel launches and
            Python, beyond the layer's bytes and FLOPs).
        pp_layer_s: the same on a pipeline stage (PP > 1); 0: ``layer_s``.
        microbatch_s: fixed cost of one pipeline micro-batch at one stage boundary beyond
            ``p2p_latency_s`` (the engine's metadata and Python around the send/recv).
        switch_s: fixed cost of one phase switch (drain, barrier, groups, stage rebuild),
            besides the weights copied host -> device.
        switch_copies_weights: a switch copies the new layout's weights host -> device
            (GPUs); ``False`` on CPU ranks, whose stages view the host shards.
        domain_size: ranks that share the fast links (a PCIe switch and socket, an NVLink
            domain), consecutive in rank order; 0: every rank.
        cross_domain_gbs: what a collective or send spanning two domains gets (the slower
            link between them sets a ring's pace).
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
    attn_gbs: float = 0.0
    step_s: float = 0.0
    tp_step_s: float = 0.0
    layer_s: float = 0.0
    pp_layer_s: float = 0.0
    microbatch_s: float = 0.0
    switch_s: float = 0.0
    switch_copies_weights: bool = True
    domain_size: int = 0
    cross_domain_gbs: float = 0.0

    def link_gbs(self, gbs: float, span: int) -> float:
        """The bandwidth a collective over ``span`` consecutive ranks gets: ``gbs`` inside
        one domain, the link between domains once it spans two."""
        if self.domain_size and span > self.domain_size and self.cross_domain_gbs:
            return min(gbs, self.cross_domain_gbs)
        return gbs


# Software costs of every GPU preset (estimates, not measured: no GPU was lent to this
# project's sessions; ``--gpu measure`` on the machine replaces them). Eager PyTorch launches
# a kernel in ~5 us and a decoder layer of this engine is ~12 kernels (norms, packed QKV, RoPE,
# KV write, attention, output projection, packed gate/up, SiLU-mul, down, residuals): ~60 us
# per layer and micro-batch. A step's host work (schedule, broadcast, metadata, sampler) is
# ~1 ms, TP's two extra collectives per step ~20 us, a pipeline micro-batch's send/recv ~20 us
# besides the link latency, a switch's drain + barrier + groups ~2 ms besides its weight copy;
# NCCL's small-message latency ~10 us.
_GPU_SOFTWARE = dict(step_s=1e-3, tp_step_s=20e-6, layer_s=60e-6, microbatch_s=20e-6,
                     switch_s=2e-3, allreduce_latency_s=10e-6, p2p_latency_s=10e-6)

# Per GPU, fp16/bf16 dense (no sparsity); host memory 80 GiB per GPU.
# a10, l4, a100: the Seesaw paper's Table 1. No NVLink on A10/L4: all-reduce and send/recv go
#   over PCIe 4.0 x8 (16 GiB/s); A100 (SXM, 40 GiB) all-reduces over NVLink and reaches the
#   host over PCIe 4.0 x16 (32 GiB/s, our figure: the table gives only NVLink).
# h100: NVIDIA H100 Tensor Core GPU datasheet, SXM5 80 GB: HBM3 3.35 TB/s (3,120 GiB/s), 989
#   TFLOPS dense BF16, NVLink 4 900 GB/s total = 450 GB/s per direction (419 GiB/s, what a
#   ring all-reduce and a send/recv can use), host over PCIe 5.0 x16 (64 GB/s = 59.6 GiB/s).
# h200: NVIDIA H200 Tensor Core GPU datasheet, SXM 141 GB: HBM3e 4.8 TB/s (4,470 GiB/s), 989
#   TFLOPS dense BF16 (the H100's compute), NVLink 4 and PCIe 5.0 x16 as the H100; 141 GB is
#   131 GiB.
#
# Topology. The paper's 8-GPU A10 / L4 servers (two sockets) hold the GPUs in two groups of
#   4 behind separate PCIe switches, one per socket: inside a group peer traffic runs at the
#   PCIe figure; traffic between groups crosses the sockets' interconnect through host memory
#   (no peer-to-peer across sockets), where NCCL's bus bandwidth on such boxes is a fraction
#   of PCIe's: 6 GiB/s here, an estimate (not measured: no GPU was lent). A100 / H100 / H200
#   HGX boards are one NVLink domain of 8; beyond a board, collectives run over the network:
#   HDR InfiniBand 200 Gb/s (23 GiB/s) per A100, NDR 400 Gb/s (46.6 GiB/s) per H100/H200.
_PCIE_SOCKETS = dict(domain_size=4, cross_domain_gbs=6)
PRESETS = {
    "a10": Hardware("a10", 24, 600, 125, 16, 16, 16, **_GPU_SOFTWARE, **_PCIE_SOCKETS),
    "l4": Hardware("l4", 24, 300, 121, 16, 16, 16, **_GPU_SOFTWARE, **_PCIE_SOCKETS),
    "a100": Hardware("a100", 40, 1555, 312, 600, 600, 32, **_GPU_SOFTWARE, domain_size=8,
                     cross_domain_gbs=23),
    "h100": Hardware("h100", 80, 3120, 989, 419, 419, 59.6, **_GPU_SOFTWARE, domain_size=8,
                     cross_domain_gbs=46.6),
    "h200": Hardware("h200", 131, 4470, 989, 419, 419, 59.6, **_GPU_SOFTWARE, domain_size=8,
                     cross_domain_gbs=46.6),
}
