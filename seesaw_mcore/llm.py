"""vLLM-style offline API: ``LLM(model=DIR).generate(prompts, SamplingParams(...))``.

SPMD: every rank constructs ``LLM`` and calls ``generate`` with the same arguments; rank 0
gets the ``RequestOutput`` list (in input order), other ranks get ``[]``. With one rank it
runs in a plain ``python`` process. ``LLM`` is thin: it tokenizes, adds requests to the
engine, loops ``Engine.step`` and hands finished outputs back.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sized
from functools import partial
from typing import Any

from seesaw_mcore import quiet
from seesaw_mcore.config import EngineConfig
from seesaw_mcore.engine.driver import RunDriver
from seesaw_mcore.engine.engine import Engine
from seesaw_mcore.engine.loop import EngineLoop, LoopRequest
from seesaw_mcore.engine.request import RequestOutput, make_samples
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.io.requests import (
    PromptType,
    eos_ids,
    load_tokenizer,
    prompt_tokens,
    requests_of,
)
from seesaw_mcore.model.lora import LoRARequest, is_adapter_name
from seesaw_mcore.model.weight_update import check_update
from seesaw_mcore.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """An offline generation engine over all ranks of the job.

    Args:
        model: local HF model folder (safetensors).
        config: a whole ``EngineConfig`` instead of keyword arguments.
        **kwargs: ``EngineConfig`` fields by name (see ``config/engine.py``), e.g.
            ``plan="P2:T2"`` (or ``prefill="P2", decode="T2"``; ``plan="auto"``: the
            planner's pick for ``workload``), ``dtype``, ``seed``, ``max_model_len``, the
            cache's ``block_size`` / ``num_blocks`` / ``kv_cache_gib`` /
            ``gpu_memory_utilization`` / ``host_kv_tokens`` / ``disk_path`` ..., the
            scheduler's ``max_num_seqs`` / ``max_prefill_tokens`` / ``policy`` ..., the
            runtime's ``dist_timeout_s`` / ``verbose``. An unknown name is a one-line error
            naming the closest known one.
    """

    def __init__(self, model: str | None = None, config: EngineConfig | None = None,
                 **kwargs: Any) -> None:
        if config is None:
            if model is None:
                raise SeesawError("LLM() needs a model folder (or config=EngineConfig(...))")
            config = EngineConfig.from_kwargs(model, **kwargs)
        elif model is not None or kwargs:
            raise SeesawError("pass either config= or model and keyword arguments, not both")
        quiet.configure(config.runtime.verbose)
        self.trial = None  # plan=auto's measured trial (planner/trial.py), on rank 0
        self._update_group = None  # a trainer's (init_weight_update_group)
        plans = []  # the plan to start on, then the others it may move to (plan=auto)
        if config.is_auto:
            from seesaw_mcore.planner.trial import auto_plans

            plans, self.trial = auto_plans(config)
        self.config = config  # as the user gave it (``plan`` may be "auto")
        path = config.model.tokenizer_path()
        self.tokenizer = load_tokenizer(path)
        self.engine = Engine(config, eos_ids(path, self.tokenizer), plans)

    @property
    def plan(self):
        """The plan (``PhasePlan``) the engine runs now: the configured one, or where
        ``plan=auto``'s trial is or ended."""
        return self.engine.plan

    @property
    def is_driver(self) -> bool:
        return self.engine.is_driver

    def get_tokenizer(self):
        """The model's transformers tokenizer (``None`` when the folder has none)."""
        return self.tokenizer

    def chat(
        self,
        messages: list[dict] | list[list[dict]],
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """vLLM's ``LLM.chat``: one conversation (``[{"role", "content"}, ...]``) or a list
        of them, rendered with the tokenizer's chat template (or ``chat_template``), then
        generated like ``generate``; ``RequestOutput.prompt`` is the rendered text."""
        from seesaw_mcore.io.reader import render_chat

        if isinstance(messages, list) and messages and isinstance(messages[0], dict):
            messages = [messages]
        prompts = [render_chat(m, self.tokenizer, chat_template, add_generation_prompt)
                   for m in messages]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate(
        self,
        prompts: PromptType | Iterable[PromptType],
        sampling_params: SamplingParams | Iterable[SamplingParams] | None = None,
        use_tqdm: bool = True,
        on_output: Callable[[RequestOutput], None] | None = None,
        request_ids: Iterable[str] | None = None,
        on_reject: Callable[[str, str], None] | None = None,
        keep_outputs: bool = True,
        lora_request: LoRARequest | list[LoRARequest | None] | None = None,
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
            lora_request: the LoRA adapter for every prompt, or one per prompt (a list, or
                an iterator read in step with ``prompts`` on rank 0: adapters then load as
                their prompts arrive); ``None``: the base model; needs
                ``LLM(enable_lora=True)``. Requests under different adapters and the base
                model share steps.

        Returns:
            On rank 0, one ``RequestOutput`` per prompt that ran, in input order; ``[]``
            elsewhere.
        """
        self.engine.check_ready()
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        total = len(prompts) if isinstance(prompts, Sized) else None
        for name, given in (("SamplingParams", sampling_params), ("request ids", request_ids)):
            if total is not None and isinstance(given, Sized) and len(given) != total:
                raise SeesawError(f"got {len(given)} {name} for {total} prompts")
        lora_of = self._adapters(lora_request, total)
        if not self.is_driver:
            self.engine.serve()
            return []
        results: dict[int, RequestOutput] = {}
        bar = quiet.progress(total, use_tqdm)

        def done(index: int, out: RequestOutput) -> None:
            if keep_outputs:
                results[index] = out
            bar.update(1)
            if on_output is not None:
                on_output(out)

        engine = self.engine
        driver = RunDriver(engine)
        if self.trial is not None and not self.trial.done:
            from seesaw_mcore.planner.trial import TrialDriver

            driver = TrialDriver(engine, self.trial)
        source = self._requests(requests_of(prompts, sampling_params, request_ids), on_reject,
                                done, time.perf_counter(), lora_of)
        loop = EngineLoop(engine, self.tokenizer, driver, source)  # the engine's one loop
        try:
            with engine.session():
                while loop.iterate():
                    pass
        finally:
            bar.close()
        return [results[i] for i in sorted(results)]

    def _adapters(self, lora_request, total: int | None
                  ) -> Callable[[int], LoRARequest | None]:
        """Prompt index -> its adapter; a list's (or one) adapters checked first (a bad one
        is a one-line error before anything runs). Adapters load as their
        prompts are admitted, at most ``max_loras`` at once (others wait)."""
        if lora_request is None:
            return lambda i: None
        if self.engine.adapters is None:
            raise SeesawError("lora_request needs LLM(enable_lora=True)")
        if not isinstance(lora_request, (list, tuple, LoRARequest)):  # a stream (rank 0's)
            stream = iter(lora_request)
            return lambda i: next(stream, None)
        many = isinstance(lora_request, (list, tuple))
        if many and total is not None and len(lora_request) != total:
            raise SeesawError(f"got {len(lora_request)} LoRA requests for {total} prompts")
        # every rank: the same one-line error everywhere, before the run starts
        self.engine.adapters.check(lora_request if many else [lora_request])
        if not many:
            return lambda i: lora_request

        def of(i: int) -> LoRARequest | None:
            if i >= len(lora_request):
                raise SeesawError(f"got {len(lora_request)} LoRA requests for more prompts")
            return lora_request[i]
        return of

    def _requests(self, requests, on_reject, done: Callable[[int, RequestOutput], None],
                  start: float, lora_of: Callable[[int], LoRARequest | None]
                  ) -> Iterator[LoopRequest]:
        """Every request (``loop_request``), made as the engine loop pulls them."""
        seq_id = 0
        for i, rid, prompt, p in requests:
            label = "prompt" if on_reject else f"prompt {i}"
            try:  # a rejected prompt's message names it by its index only if raised
                req = self.loop_request(i, str(rid), prompt, p, seq_id, label,
                                        partial(done, i), start, lora=lora_of(i))
            except SeesawError as e:
                if on_reject is None:
                    raise
                on_reject(rid, str(e))
                continue
            seq_id += p.n
            yield req

    def loop_request(self, index: int, request_id: str, prompt: PromptType,
                     params: SamplingParams, first_seq_id: int, label: str,
                     sink: Callable[[RequestOutput], None], arrival: float,
                     kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY,
                     lora: LoRARequest | None = None) -> LoopRequest:
        """A prompt as the engine loop takes it: tokenized and checked against the model and
        the caches (a one-line error naming it by ``label``), its samples made
        (``make_samples``: seeded by request id, not position)."""
        toks = prompt_tokens(label, prompt, self.tokenizer, self.engine.model_cfg)
        max_tokens = self.engine.check_request(label, len(toks), params.max_tokens)
        samples = make_samples(first_seq_id, index, request_id, toks, params, max_tokens,
                               self.config.seed)
        if lora is not None:  # a bad adapter: this prompt's error
            if self.engine.adapters is None:
                raise SeesawError("lora_request needs enable_lora=True")
            self.engine.adapters.check([lora])
        text = prompt if isinstance(prompt, str) else prompt.get("prompt")
        return LoopRequest(index, request_id, text, toks, samples, sink, kind, arrival,
                           lora=lora)

    def update_weights(self, weights: Iterable[tuple[str, Any]],
                       lora_name: str | None = None) -> None:
        """Takes new weights in place (an RL or eval loop's new checkpoint), on every rank.

        ``weights``: ``(name, tensor)`` pairs with HF parameter names
        (``model.layers.3.self_attn.q_proj.weight``, or the fused ``qkv_proj`` /
        ``gate_up_proj``) and full, unsharded tensors, as a trainer hands them over after
        gathering; a subset of the model's names is a partial update. Every rank receives
        the same pairs and takes its slices; every copy it holds is written: the live device
        stage and, for a Seesaw plan, both layouts' host shards (the next switch brings the
        new weights). Every pair is checked before anything is written (a foreign name, a
        shape that is not the full tensor's, a non-float tensor: a one-line error, nothing
        changed). The prefix cache is forgotten. Between ``generate`` calls only.

        Adapter-only sync (RL with LoRA): pairs named as PEFT saves them
        (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``) replace those
        tensors of the loaded adapter ``lora_name`` (or the only one loaded), as if the
        adapter were loaded again from a folder holding them.
        """
        pairs = list(weights)
        if pairs and all(is_adapter_name(n) for n, _ in pairs):  # an adapter-only sync
            if self.engine.adapters is None:
                raise SeesawError("update_weights: LoRA tensors need LLM(enable_lora=True)")
            self.engine.adapters.update(pairs, lora_name)
            return
        check_update(self.engine.model_cfg, pairs)
        self.engine.update_weights(pairs)

    def init_weight_update_group(self, master_address: str, master_port: int,
                                 rank_offset: int, world_size: int) -> None:
        """Joins a trainer's weight-update group (every rank; SGLang's and vLLM's RLHF
        recipe): engine rank ``i`` is group rank ``rank_offset + i``; the trainer's rank 0
        hosts the rendezvous at ``master_address:master_port`` and is group rank 0."""
        from seesaw_mcore.runtime import groups
        from seesaw_mcore.runtime.weight_sync import WeightUpdateGroup

        rank = rank_offset + self.engine.rank
        if not 0 < rank < world_size:
            raise SeesawError(f"init_weight_update_group: engine rank {self.engine.rank} + "
                              f"rank_offset {rank_offset} is outside 1..{world_size - 1}")
        self._update_group = WeightUpdateGroup(
            master_address, master_port, rank, world_size, groups.device(),
            self.engine.config.runtime.dist_timeout_s)

    def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list
                                        ) -> None:
        """Receives ``names`` (full tensors, HF names, of ``dtypes`` and ``shapes``) from
        the trainer's rank 0, in that order, over the group ``init_weight_update_group``
        made, and takes them like ``update_weights`` (every rank). A bad name or shape is a
        one-line error after the broadcasts are received (the trainer is never left
        waiting); nothing is written then."""
        group = self._update_group
        if group is None:
            raise SeesawError("update_weights_from_distributed needs init_weight_update_group "
                              "first")
        pairs = group.receive(names, dtypes, shapes,
                              lambda meta: check_update(self.engine.model_cfg, meta))
        self.engine.update_weights(pairs)

    def sleep(self, level: int = 1) -> None:
        """Frees memory between ``generate`` calls (vLLM's sleep mode, every rank), for a
        trainer sharing the GPUs: level 1 frees the device KV cache and the device weights
        (the host copies every rank keeps for re-sharding stay, so ``wake_up`` restores
        them by a host -> device copy); level 2 also frees those host copies, so
        ``update_weights`` with every parameter must follow ``wake_up``. Cached prefixes
        are forgotten. On CPU ranks the weights are the host copies: level 1 frees the KV
        cache and the packed copies, level 2 the weights too. The host and disk KV tiers
        stay.
        """
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Allocates again what ``sleep`` freed (every rank): ``tags`` ``["weights"]`` or
        ``["kv_cache"]`` wakes one part (vLLM's: weights first, update them, then the KV
        cache, so the two never overlap in memory); default both."""
        self.engine.wake_up(tags)

    def reset_prefix_cache(self) -> None:
        """Forgets every cached prefix (vLLM's ``reset_prefix_cache``). A static plan's
        cache lasts across ``generate`` calls; a Seesaw plan's lasts one call (its device
        caches last a phase, its host tier empties by the end of a call)."""
        self.engine.reset_prefix_cache()

    def shutdown(self) -> None:
        """Releases the tiers and destroys the process groups (the job can then exit
        cleanly)."""
        self.engine.shutdown()

    def close(self) -> None:
        """Releases the tiers and the weight-update group (``init_weight_update_group``)
        but keeps the job's process groups, for another ``LLM`` in the same job."""
        if self._update_group is not None:
            self._update_group.close()
            self._update_group = None
        self.engine.close()
