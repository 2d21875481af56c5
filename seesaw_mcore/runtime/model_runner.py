"""A scheduled step -> tier copies, the pipeline forward (send/recv between stages), sampling.

Every rank calls ``execute`` with the same ``SchedulerOutput``; each runs its own stage, and
the last stage's TP rank 0 samples and returns the tokens. ``forward`` (logits of chosen
tokens, no sampling) serves the parity tool and calibration.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.distributed as dist

from seesaw_mcore import h2d
from seesaw_mcore.config import ModelConfig, ParallelConfig, PhasePlan
from seesaw_mcore.contract import (
    HOST,
    KVMove,
    RunnerOutput,
    RunOptions,
    SampledToken,
    SchedulerOutput,
)
from seesaw_mcore.kv.copier import KVCopier
from seesaw_mcore.kv.transfer import CopyQueue
from seesaw_mcore.model import cpu_attention, invariant
from seesaw_mcore.model.attention import AttentionMetadata
from seesaw_mcore.model.llama import LlamaStage
from seesaw_mcore.model.loader import open_checkpoint
from seesaw_mcore.runtime import groups, memory
from seesaw_mcore.runtime.adapters import RankAdapters
from seesaw_mcore.runtime.cuda_graphs import DecodeGraphs
from seesaw_mcore.runtime.kv_buffer import KVBuffer
from seesaw_mcore.runtime.prompt_logprobs import attach_prompt_logprobs
from seesaw_mcore.runtime.routes import attach_routes, stage_routes
from seesaw_mcore.runtime.sampler import sample
from seesaw_mcore.runtime.weights import ShardStore


class ModelRunner:
    """Holds this rank's stage and its paged KV cache under the active layout of a plan.

    Weights come from the ``ShardStore`` (both phases' shards in pinned host memory): on
    CPU ranks the stage's parameters are views of the stored tensors (no copy at a switch),
    on GPU ranks they are copied to the device. The paged KV cache is a ``KVBuffer`` viewed
    per layout.

    Args:
        cfg: model architecture.
        plan: the layouts to run (a ``ParallelConfig`` means a static plan).
        dtype: parameter and KV dtype.
        block_size: tokens per KV block.
        store: both phases' shards of this rank (built from the checkpoint when omitted).
        async_swap: tier copies overlap compute on a background thread (False: inline).
        layouts: every layout this runner may use (default: the plan's two); ``plan=auto``'s
            trial passes every candidate's.
        graph_sizes: decode batch sizes to capture as CUDA graphs (``runtime/cuda_graphs.py``);
            ``None``: decode runs eagerly (``enforce_eager``).
        max_model_len: the longest sequence (a graph's block-table width).
        options: the engine's logprobs mode, routed experts and batch-invariant mode.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        plan: PhasePlan | ParallelConfig,
        dtype: torch.dtype,
        block_size: int,
        store: ShardStore | None = None,
        async_swap: bool = True,
        layouts: list[ParallelConfig] | None = None,
        graph_sizes: list[int] | None = None,
        max_model_len: int | None = None,
        options: RunOptions | None = None,
    ) -> None:
        if isinstance(plan, ParallelConfig):
            plan = PhasePlan(plan, plan)
        self.cfg, self.dtype, self.block_size = cfg, dtype, block_size
        self.layouts = list(dict.fromkeys(layouts or [plan.prefill, plan.decode]))
        for lay in self.layouts:
            cfg.check_layout(lay)
        groups.prepare(self.layouts)
        self.device = groups.device()
        self.options = options = options or RunOptions()
        if self.device.type == "cpu":  # build (once per machine) before the first step
            cpu_attention.available()
        if options.batch_invariant:
            invariant.check_device(self.device)
        invariant.enable(options.batch_invariant)
        self._routes: torch.Tensor | None = None  # [T, MoE layers, k] the last stage's
        self.adapters = RankAdapters(cfg, options.max_loras, options.max_lora_rank, dtype,
                                     self.device) if options.max_loras else None
        self.store = store or ShardStore(open_checkpoint(cfg), self.layouts, dist.get_rank(),
                                         dtype)
        self.kv = KVBuffer(cfg, self.layouts, dtype, block_size, self.device)
        self.transfer = CopyQueue(groups.accelerator(), async_swap)
        self.copier = KVCopier(self.transfer, cfg.head_dim)  # host / disk tiers: set later
        self.model: LlamaStage | None = None
        self._resident: dict[ParallelConfig, LlamaStage] = {}  # stages that cost no memory
        self.graph_sizes = graph_sizes
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        self._graphs: DecodeGraphs | None = None  # of the live stage and KV view
        self._graphs_for = -1  # the KV views' version they were captured over
        self.graph_steps = 0  # decode steps run padded to a bucket (replayed on CUDA)
        self.use(plan.prefill)

    def use(self, layout: ParallelConfig) -> int:
        """Activates ``layout``: its process groups, its stage rebuilt from the host shards
        and its view of the KV buffer.

        Returns:
            Weight bytes copied host -> device (0 on CPU ranks: the stage views the store).
        """
        self.transfer.drain()  # tier copies address the KV view of the old layout
        self._graphs = None  # captured over the old stage: its memory goes first
        self.info = groups.activate(layout)
        copied = 0
        if layout in self._resident:  # its weights are views of the store: reuse the stage
            self.model = self._resident[layout]
        else:
            self.model = None  # release the old stage's device weights first
            model = LlamaStage(self.cfg, self.info, self.dtype)
            copied = model.bind_shard(self.store.shard(layout), self.device)
            if copied:
                groups.accelerator().synchronize()  # non-blocking copies from pinned memory
            else:
                self._resident[layout] = model
            self.model = model
        self.model.record_routes(self.options.routed_experts)
        self.kv.bind(layout, self.info.rank, len(self.model.layers))
        return copied

    def allocate_kv(self, num_blocks: int | dict[ParallelConfig, int]) -> None:
        """Allocates the paged cache: ``num_blocks`` blocks under each of its layouts
        (one number: the same for every layout), in one buffer sized for the largest."""
        self._graphs = None  # they hold the old buffer's views
        self.kv.allocate(num_blocks)

    @property
    def routes_shape(self) -> tuple[int, int] | None:
        """``(MoE layers, top_k)`` of each fed token's routed experts (``None``: off)."""
        if not self.options.routed_experts:
            return None
        return len(self.cfg.moe_layers), self.cfg.num_experts_per_tok

    @property
    def kv_cache(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per local layer of the live layout, K and V ``[NB, BS, Hkv/TP, D]``."""
        return self.kv.layers

    @property
    def kv_cache_bytes(self) -> int:
        """Bytes of the device KV buffer (0 when none is allocated)."""
        return self.kv.nbytes

    @torch.no_grad()
    def update_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        """New values for HF tensors (full, checked by ``weight_update.check_update``): every
        layout's host shard takes its slices, the live device stage copies the parameters
        that changed (CPU stages view the shards), packed CPU weights are re-packed. Tensors
        keep their storage, so captured CUDA graphs stay valid.

        Returns:
            Parameters of the live stage written.
        """
        self.transfer.drain()
        return self._refresh(self.store.update(weights))

    def load_weights(self, ckpt) -> int:
        """Every weight from ``ckpt`` (another checkpoint of this model, opened), written
        like ``update_weights``. Returns the parameters of the live stage written."""
        self.transfer.drain()
        return self._refresh(self.store.reload(ckpt, self.dtype))

    def _refresh(self, touched: dict[str, set[str]]) -> int:
        """The live device stage copies the host shard's ``touched`` parameters; packed
        CPU weights are re-packed."""
        layout = self.info.layout
        names = touched.get(str(layout), set())
        if self.model is not None and layout not in self._resident and names:
            params, shard = dict(self.model.named_parameters()), self.store.shard(layout)
            for name in names:
                params[name].data.copy_(shard[name], non_blocking=True)
            groups.accelerator().synchronize()
        for stage in {id(s): s for s in [*self._resident.values(), self.model]
                      if s is not None}.values():
            stage.repack()
        return len(names)

    def release(self) -> None:
        """Drops the KV cache and the device stages and returns PyTorch's cached device
        memory to the driver, so another engine in this process can size its cache."""
        self.kv.drop()
        self.model, self._resident, self._graphs = None, {}, None
        mem = memory.device_memory()
        if mem is not None:
            mem.empty_cache()

    @contextlib.contextmanager
    def scratch_kv(self, num_blocks: int) -> Iterator[None]:
        """A KV cache of ``num_blocks`` blocks (a profiling run's), dropped on exit."""
        self._graphs = None
        with self.kv.scratch(num_blocks):
            yield

    def _swap(self, moves: list[KVMove], to_tier: bool, layers: range | None = None) -> None:
        self.copier.swap(self.kv.view, moves, to_tier, layers)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: list[int],
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        logits_indices: list[int],
    ) -> torch.Tensor | None:
        """Runs one batch through every pipeline stage and returns chosen logits.

        Args:
            input_ids: flat new tokens of all sequences ``[T]`` (each sequence's tokens sit
                at positions ``context_len - query_len ...``).
            query_lens: new tokens per sequence.
            context_lens: cached + new tokens per sequence.
            block_tables: block ids per sequence.
            logits_indices: which of the ``T`` tokens need logits.

        Returns:
            ``[N, vocab]`` float32 logits on the last stage's ranks, ``None`` elsewhere.
        """
        invariant.enable(self.options.batch_invariant)  # (per process: engines may differ)
        sends: list = []
        hidden, _ = self._stage(input_ids, query_lens, context_lens, block_tables, sends)
        for work, _buf in sends:
            work.wait()
        if hidden is None:
            return None
        idx = h2d.tensor(logits_indices, torch.long, self.device)
        return self.model.logits(hidden[idx])  # [N, V]

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> RunnerOutput | None:
        """Runs a scheduled step; micro-batches flow through the stages back to back, so
        stage ``s`` computes micro-batch ``m`` while stage ``s+1`` computes ``m-1``.

        Tier copies: the last step's must be done before anything reuses blocks; victims
        leave before the forward (their blocks are reused by it); admissions (``swap_in``)
        come in behind the forward, for sequences that join the next step; each prefill
        layer's new KV leaves for the host tier right after its attention, while the next
        layers compute (disk records, and everything when copies are inline, after the
        micro-batch).

        Returns:
            The sampled tokens on the last stage's TP rank 0, ``None`` on other ranks.
        """
        invariant.enable(self.options.batch_invariant)  # (per process: engines may differ)
        self.transfer.drain()
        if step.preempt:
            self.transfer.submit(lambda: self._swap(step.preempt, to_tier=True))
            self.transfer.drain()
        if step.swap_in:
            self.transfer.submit(lambda: self._swap(step.swap_in, to_tier=False))
        outgoing = {m.seq_id: m for m in step.swap_out}
        sends: list = []
        sampled: list[SampledToken] = []
        for mb in step.micro_batches:
            ids = [t for s in mb for t in s.token_ids]
            qlens = [len(s.token_ids) for s in mb]
            ctx = [s.start_pos + len(s.token_ids) for s in mb]
            out = [outgoing[s.seq_id] for s in mb if s.seq_id in outgoing]
            # async: host-tier KV leaves layer by layer; else (and disk records) after the stage
            by_layer = ([m for m in out if m.tier_slots.tier == HOST]
                        if self.transfer.is_async else [])
            after = [m for m in out if m not in by_layer]
            stash = (lambda i, moves=by_layer: self.transfer.submit(
                lambda: self._swap(moves, to_tier=True, layers=range(i, i + 1)))
            ) if by_layer else None
            hidden, meta = self._stage(ids, qlens, ctx, [s.block_table for s in mb], sends,
                                       stash, [s.lora for s in mb])
            if after:
                self.transfer.submit(lambda moves=after: self._swap(moves, to_tier=True))
            if hidden is None:
                continue
            last = meta.cu_query_lens[1:len(mb) + 1].long() - 1  # [B] each one's last token
            logits = self.model.logits(hidden[last])  # [B, V]
            mode = self.options.logprobs_mode
            if self.info.tp_rank == 0:
                mb_tokens = sample(logits, [s.seq_id for s in mb], [s.sampling for s in mb],
                                   mode)
                if self._routes is not None:
                    attach_routes(mb_tokens, qlens, self._routes)
                sampled += mb_tokens
            else:
                mb_tokens = [None] * len(mb)
            attach_prompt_logprobs(self.model.logits, mb, hidden, mb_tokens,
                                   keep=self.info.tp_rank == 0, mode=mode)
        for work, _buf in sends:
            work.wait()
        if self.info.is_last_stage and self.info.tp_rank == 0:
            return RunnerOutput(sampled)
        return None

    def drain(self) -> None:
        """Waits for this rank's queued tier copies (before the host tier changes hands)."""
        self.transfer.drain()

    def _stage(self, input_ids, query_lens, context_lens, block_tables, sends,
               after_attention=None, loras: list[int] | None = None):
        """This rank's stage on one micro-batch; returns (hidden ``[T, H]``, the step's
        attention metadata) on the last stage, else queues an async send of the hidden states
        to the next stage and returns ``(None, metadata)``.
        ``after_attention(i)`` runs once local layer ``i`` has written its KV; ``loras``:
        each sequence's adapter index (0 or ``None``: the base model)."""
        info, dev = self.info, self.device
        lora = self.adapters.active(info, loras, query_lens) \
            if self.adapters is not None and loras else None
        self.model.set_lora(lora)
        graphs = None if lora is not None else self._decode_graphs(query_lens, after_attention)
        if graphs is not None:  # a decode step, replayed from its bucket's CUDA graph
            x = h2d.tensor(input_ids, torch.long, dev)  # [B]
            self.graph_steps += 1
            return graphs.forward(x, query_lens, context_lens, block_tables)  # ([B, H], meta)
        meta = AttentionMetadata.build(query_lens, context_lens, block_tables, self.block_size, dev,
                                       invariant=self.options.batch_invariant)
        t = len(input_ids)
        if info.is_first_stage:
            x = h2d.tensor(input_ids, torch.long, dev)  # [T]
        else:
            x = torch.empty(t, self.cfg.hidden_size, dtype=self.dtype, device=dev)
            dist.recv(x, src=info.prev_rank)  # [T, H]
        hidden = self.model(x, meta.positions, self.kv_cache, meta, after_attention)  # [T, H]
        routes = stage_routes(self.model, self.cfg, info, t) if self.options.routed_experts \
            else None
        if info.is_last_stage:
            self._routes = routes
            return hidden, meta
        hidden = hidden.contiguous()
        sends.append((dist.isend(hidden, dst=info.next_rank), hidden))
        if routes is not None and routes.shape[1]:
            sends.append((dist.isend(routes, dst=info.next_rank), routes))
        return None, meta

    def _decode_graphs(self, query_lens: list[int], after_attention) -> DecodeGraphs | None:
        """The live stage's decode graphs when this step can replay one: a decode step (one
        token per sequence) within the largest bucket, a single-stage layout, no per-layer
        hook; built lazily per stage and KV view."""
        if (self.graph_sizes is None or after_attention is not None or self.info.layout.pp > 1
                or len(query_lens) > self.graph_sizes[-1] or any(q != 1 for q in query_lens)):
            return None
        if self._graphs is None or self._graphs_for != self.kv.version:
            self._graphs = DecodeGraphs(
                self.model, self.kv.layers, self.graph_sizes,
                -(-self.max_model_len // self.block_size), self.kv.num_blocks[self.info.layout],
                self.block_size, capture=self.device.type == "cuda")
            self._graphs_for = self.kv.version
        return self._graphs

