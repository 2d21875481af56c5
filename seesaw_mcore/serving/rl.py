"""The endpoints RL frameworks call (SGLang's and vLLM's names and bodies): token-in /
token-out ``/generate``, abort, pause and continue, weight updates (from a trainer's
process group or from disk), sleep and wake-up, the prefix cache, model info.

Commands answer ``{"success": true, "message": ...}``; a refused one answers HTTP 400 with
``{"success": false, "message": <one line>}`` and changes nothing.
"""

from __future__ import annotations

import uuid
from typing import Annotated

import torch
from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse

from seesaw_mcore.async_llm import EngineDeadError
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.sampling_params import RequestOutputKind
from seesaw_mcore.serving.protocol import (
    AbortRequest,
    DiskUpdateRequest,
    DistributedUpdateRequest,
    GenerateRequest,
    InitGroupRequest,
    PauseRequest,
    RequestError,
    WakeUpRequest,
    parse,
)
from seesaw_mcore.serving.responses import generate_body

PAUSE_MODES = {"in_place": "keep", "retract": "keep"}  # SGLang's names for ours


def _ok(message: str = "ok", **extra) -> dict:
    return {"success": True, "message": message, **extra}


async def _command(coro) -> JSONResponse | dict:
    """Runs an engine command; a ``SeesawError`` is a 400 with ``success`` false."""
    try:
        await coro
    except SeesawError as e:
        status = 503 if isinstance(e, EngineDeadError) else 400
        return JSONResponse({"success": False, "message": str(e)}, status_code=status)
    return _ok()


def add_rl_routes(app: FastAPI, server) -> None:
    """Adds the RL endpoints to ``app`` over ``server`` (``serving.app.Server``)."""
    llm = server.llm

    @app.post("/generate")
    async def generate(request: Request):
        server.check_open()
        req = parse(GenerateRequest, await request.body())
        server.warn_ignored(req.ignored_fields())
        texts = req.prompts()
        prompts = [p if isinstance(p, str) else {"prompt_token_ids": p} for p in texts]
        params = req.sampling(len(prompts))
        kind = RequestOutputKind.CUMULATIVE if req.stream else RequestOutputKind.FINAL_ONLY
        for p in params:
            p.output_kind = kind
        rid = req.rid if isinstance(req.rid, str) else uuid.uuid4().hex
        ids = list(req.rid) if isinstance(req.rid, list) else None
        if ids is not None and len(ids) != len(prompts):
            raise RequestError(f"got {len(ids)} rids for {len(prompts)} prompts", "rid")
        streams = await server.start(prompts, params, rid, ids,
                                     server.adapters_named(req.lora_path, len(prompts)))
        single = not req.batched and params[0].n == 1  # SGLang: one body, else a list

        def bodies(out) -> list[dict]:
            return [generate_body(out, c, server.decode, req.return_text_in_logprobs)
                    for c in out.outputs]

        if not req.stream:
            outs = await server.finals(request, rid, streams)
            flat = [b for out in outs for b in bodies(out)]
            return flat[0] if single else flat

        def indexed(i: int, out) -> list[dict]:
            return [{**body, "index": i * params[i].n + k}
                    for k, body in enumerate(bodies(out))]

        return server.event_stream(rid, streams, indexed)

    @app.post("/abort_request")
    async def abort_request(request: Request):
        req = parse(AbortRequest, await request.body())
        if req.abort_all:
            return _ok(f"aborted {await llm.abort_all()} requests")
        if req.rid is None:
            raise RequestError("give rid or abort_all=true", "rid")
        rids = [req.rid] if isinstance(req.rid, str) else list(req.rid)
        ids = [e for r in rids for e in server.groups.get(r, [r])]
        await llm.abort(ids)
        return _ok()

    @app.post("/pause_generation")
    async def pause_generation(request: Request):
        body = await request.body()
        req = parse(PauseRequest, body if body.strip() else b"{}")
        mode = PAUSE_MODES.get(req.mode, req.mode)
        return await _command(llm.pause_generation(mode, req.clear_cache))

    @app.post("/continue_generation")
    async def continue_generation():
        return await _command(llm.resume_generation())

    @app.post("/init_weights_update_group")
    async def init_weights_update_group(request: Request):
        req = parse(InitGroupRequest, await request.body())
        return await _command(llm.init_weight_update_group(
            req.master_address, req.master_port, req.rank_offset, req.world_size))

    @app.post("/update_weights_from_distributed")
    async def update_weights_from_distributed(request: Request):
        req = parse(DistributedUpdateRequest, await request.body())
        if not len(req.names) == len(req.dtypes) == len(req.shapes):
            raise RequestError(f"names, dtypes and shapes differ in length ({len(req.names)}, "
                               f"{len(req.dtypes)}, {len(req.shapes)})", "names")
        for d in req.dtypes:
            if not isinstance(getattr(torch, d.removeprefix("torch."), None), torch.dtype):
                raise RequestError(f"dtypes: {d!r} is not a torch dtype", "dtypes")
        return await _command(llm.update_weights_from_distributed(
            req.names, [d.removeprefix("torch.") for d in req.dtypes], req.shapes))

    @app.post("/update_weights_from_disk")
    async def update_weights_from_disk(request: Request):
        req = parse(DiskUpdateRequest, await request.body())
        return await _command(llm.update_weights_from_disk(req.model_path))

    @app.post("/sleep")
    async def sleep(level: int = 1):
        return await _command(llm.sleep(level))

    @app.post("/wake_up")
    async def wake_up(tags: Annotated[list[str] | None, Query()] = None):
        return await _command(llm.wake_up(tags))

    @app.post("/release_memory_occupation")  # SGLang's sleep
    async def release_memory_occupation():
        return await _command(llm.sleep(1))

    @app.post("/resume_memory_occupation")  # SGLang's wake-up
    async def resume_memory_occupation(request: Request):
        body = await request.body()
        req = parse(WakeUpRequest, body if body.strip() else b"{}")
        return await _command(llm.wake_up(req.tags))

    @app.get("/is_sleeping")
    async def is_sleeping():
        return {"is_sleeping": await llm.is_sleeping()}

    @app.api_route("/reset_prefix_cache", methods=["GET", "POST"])
    async def reset_prefix_cache():
        return await _command(llm.reset_prefix_cache())

    @app.api_route("/flush_cache", methods=["GET", "POST"])  # SGLang's
    async def flush_cache():
        return await _command(llm.reset_prefix_cache())

    @app.get("/get_model_info")
    async def get_model_info():
        eng = llm.engine
        return {"model_path": server.model_path, "tokenizer_path": server.model_path,
                "served_model_name": server.model_name, "is_generation": True,
                "max_model_len": eng.max_model_len, "plan": str(eng.plan),
                "weights_version": eng.weights_version,
                "dtype": str(eng.dtype).removeprefix("torch.")}
