"""An lm-evaluation-harness backend on this engine: ``generate_until``, ``loglikelihood`` and
``loglikelihood_rolling``, batched through ``LLM.generate`` (prompt logprobs for the
likelihoods), on any plan.

    import lm_eval
    from seesaw_mcore.eval_harness import SeesawLM
    lm_eval.simple_evaluate(model=SeesawLM("models/tiny-llama", plan="P2:T2"), tasks=[...])

or, once this module is imported, ``model="seesaw", model_args="pretrained=DIR,plan=T2"``; on
several ranks, ``launch/eval.py`` under the deepspeed launcher (every rank runs the same
harness calls; rank 0's results are broadcast, so lm-eval sees one data-parallel rank).
"""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    maybe_truncate,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from seesaw_mcore.config import EngineConfig
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.llm import LLM
from seesaw_mcore.model.lora import LoRARequest
from seesaw_mcore.sampling_params import SamplingParams


@register_model("seesaw")
class SeesawLM(TemplateLM):
    """lm-eval's model interface over ``seesaw_mcore.LLM``.

    Args:
        pretrained: local HF model folder.
        max_gen_toks: default generation budget of ``generate_until``.
        add_bos_token: prepend BOS when tokenizing (``None``: the tokenizer's default).
        config: a whole ``EngineConfig`` instead of ``pretrained`` and keywords.
        lora_local_path: a PEFT LoRA adapter every request runs under (lm-eval's vLLM
            backend's name; ``config.lora.path`` too).
        **kwargs: ``LLM`` keyword arguments (``plan``, ``prefill``/``decode``, ``dtype``,
            ``max_model_len``, cache and scheduler fields ...). lm-eval's own ``batch_size``
            and ``device`` are accepted and ignored: the engine batches continuously.
    """

    def __init__(self, pretrained: str | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, config: EngineConfig | None = None,
                 lora_local_path: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        for ignored in ("batch_size", "max_batch_size", "device"):
            kwargs.pop(ignored, None)
        if lora_local_path and config is None:
            kwargs["enable_lora"] = True
        self.llm = LLM(pretrained, config=config, **kwargs)
        path = lora_local_path or self.llm.engine.config.lora.path
        self.lora = None if not path else LoRARequest(
            self.llm.engine.config.lora.name or os.path.basename(os.path.normpath(path)), 1,
            path)
        if self.lora is not None and self.llm.engine.adapters is None:
            raise SeesawError("lora_local_path needs enable_lora=True")
        self.tokenizer = self.llm.get_tokenizer()
        self._max_gen_toks, self.add_bos_token = max_gen_toks, add_bos_token

    # lm-eval splits requests across its ranks; ours are SPMD over one request list
    @property
    def rank(self) -> int:
        return 0

    @property
    def world_size(self) -> int:
        return 1

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self.llm.engine.max_model_len

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.decode(self.prefix_token_id)
            if bos and string.startswith(bos):  # already there: do not add it twice
                add_special_tokens = False
        kw = {} if add_special_tokens is None else {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **kw)

    def _generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list:
        """Every rank calls with the same arguments; every rank gets rank 0's outputs."""
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                 use_tqdm=False, lora_request=self.lora)
        if dist.is_initialized() and dist.get_world_size() > 1:
            box = [outs]
            dist.broadcast_object_list(box, src=0)
            outs = box[0]
        return outs

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:
        """Sum of the continuation's logprobs and whether each of its tokens is the argmax,
        from the prompt logprobs of ``context + continuation`` (left-truncated to leave
        room for the one generated token), asked for the continuation's positions only, so
        contexts shared by several continuations are computed once (prefix caching)."""
        limit = self.max_length - 1
        prompts, ctxlens = [], []
        for _, ctx, cont in requests:
            full = (ctx + cont)[-limit:]
            prompts.append(full)
            ctxlens.append(len(full) - len(cont))
        # only the continuation's positions: the context may come from the prefix cache
        params = [SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0,
                                 prompt_logprobs_from=ctxlen, ignore_eos=True)
                  for ctxlen in ctxlens]
        res = []
        for (cache_key, _, _), full, ctxlen, out in zip(
                requests, prompts, ctxlens, self._generate(prompts, params)):
            entries = out.prompt_logprobs[ctxlen:]
            tokens = full[ctxlen:]
            answer = (sum(e[t].logprob for e, t in zip(entries, tokens)),
                      all(e[t].rank == 1 for e, t in zip(entries, tokens)))
            res.append(answer)
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
        return res

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity-style scores: disjoint rolling windows of ``max_length`` tokens, as
        lm-eval's HF backend makes them."""
        windows, counts = [], []
        for (string,) in (req.args for req in requests):
            ws = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 2, context_len=1)]
            windows += ws
            counts.append(len(ws))
        scores = self._loglikelihood_tokens(windows)
        out, i = [], 0
        for req, n in zip(requests, counts):
            total = sum(s for s, _ in scores[i:i + n])
            i += n
            out.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``) generation up to the task's stop strings,
        EOS or ``max_gen_toks``."""
        eos = self.tokenizer.decode(self.eot_token_id)
        prompts, params, untils = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kw = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self.max_gen_toks)
            until = handle_stop_sequences(kw.pop("until", None), eos=eos)
            max_gen = int(kw.pop("max_gen_toks", self.max_gen_toks))
            toks, max_gen = maybe_truncate(self.tok_encode(context), max_gen_toks=max_gen,
                                           max_model_len=self.max_length, verbose=False)
            prompts.append(toks)
            params.append(SamplingParams(
                temperature=float(kw.get("temperature", 0.0)),
                top_p=float(kw.get("top_p", 1.0)), max_tokens=max_gen,
                stop=[s for s in until if s],
                seed=kw.get("seed")))
            untils.append(until)
        res = []
        for (context, gen_kwargs), until, out in zip(
                (req.args for req in requests), untils, self._generate(prompts, params)):
            text = postprocess_generated_text(out.outputs[0].text, until, None)
            res.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return res
