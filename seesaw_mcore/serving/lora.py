"""vLLM's LoRA endpoints (also under SGLang's names, without ``/v1``): ``POST
/v1/load_lora_adapter`` (``{"lora_name", "lora_path"}``)
loads a PEFT adapter on every rank under a name requests then give as ``model``;
``POST /v1/unload_lora_adapter`` (``{"lora_name"}``) unloads it. Success answers 200 with
vLLM's line of text; a refused call answers 400 (404: an unknown name) with an OpenAI error
body and changes nothing."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse

from seesaw_mcore.async_llm import EngineDeadError
from seesaw_mcore.errors import SeesawError
from seesaw_mcore.model.lora import LoRARequest
from seesaw_mcore.serving.protocol import LoadLoRARequest, RequestError, UnloadLoRARequest, parse


def add_lora_routes(app: FastAPI, server) -> None:
    """Adds the LoRA endpoints to ``app`` over ``server`` (``serving.app.Server``)."""
    llm = server.llm

    async def run(coro) -> None:
        try:
            await coro
        except EngineDeadError as e:
            raise RequestError(str(e), status=503) from None
        except SeesawError as e:
            raise RequestError(str(e)) from None

    @app.post("/v1/load_lora_adapter")
    @app.post("/load_lora_adapter")  # SGLang's name
    async def load(request: Request):
        req = parse(LoadLoRARequest, await request.body())
        await run(load_adapter(server, req.lora_name, req.lora_path))
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added "
                                 "successfully.")

    @app.post("/v1/unload_lora_adapter")
    @app.post("/unload_lora_adapter")  # SGLang's name
    async def unload(request: Request):
        req = parse(UnloadLoRARequest, await request.body())
        lora = server.loras.get(req.lora_name)
        if lora is None:
            raise RequestError(f"The lora adapter '{req.lora_name}' cannot be found",
                               "lora_name", status=404)
        await run(llm.remove_lora(lora.lora_int_id))
        del server.loras[req.lora_name]
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed "
                                 "successfully.")


async def load_adapter(server, name: str, path: str) -> None:
    """Loads the adapter at ``path`` on every rank as ``name`` (a one-line ``SeesawError``
    for a taken name or a bad adapter)."""
    if name in server.loras or name == server.model_name:
        raise SeesawError(f"The lora adapter '{name}' has already been loaded")
    if server.llm.engine.adapters is None:
        raise SeesawError("LoRA adapters need the server started with lora.enable_lora=true")
    lora = LoRARequest(name, next(server.lora_ids), path)
    await server.llm.add_lora(lora)
    server.loras[name] = lora
