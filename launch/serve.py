"""The OpenAI-compatible server (and the endpoints RL frameworks call) on every rank of a job:

    deepspeed --no_local_rank --num_gpus 2 launch/serve.py model.path=DIR plan=P2:T2 \
        server.port=8000

Rank 0 runs the engine loop and the HTTP front-end (FastAPI + uvicorn); every other rank
follows the engine's steps. When it listens, rank 0 prints one line,
``serving <model> on http://HOST:PORT (plan ...)``. SIGTERM (or Ctrl-C) stops accepting
requests, lets those in flight finish for up to ``server.shutdown_timeout_s``, aborts the
rest and exits 0; a failed rank makes it answer 503 and exit 1.

The configuration is ``ServeConfig``: the engine's ``EngineConfig`` (as ``launch/infer.py``
takes it) plus the ``server`` group (``seesaw_mcore/serving/config.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from seesaw_mcore.config import EngineConfig  # noqa: E402
from seesaw_mcore.config.sections import resolve_model_paths  # noqa: E402
from seesaw_mcore.errors import SeesawError, exit_status  # noqa: E402
from seesaw_mcore.serving.config import ServerConfig  # noqa: E402


@dataclass
class ServeConfig(EngineConfig):
    """The engine's configuration plus ``server``."""

    server: ServerConfig = field(default_factory=ServerConfig)

    def __post_init__(self) -> None:  # checked by EngineConfig.from_mapping, once merged
        pass


ConfigStore.instance().store(name="serve_schema", node=ServeConfig)


def run(cfg: DictConfig) -> int:
    """The job; returns the exit status."""
    from seesaw_mcore import quiet

    quiet.configure(bool(cfg.runtime.verbose))
    raw = OmegaConf.to_container(cfg, resolve=True)
    server_cfg = ServerConfig(**raw.pop("server"))
    resolve_model_paths(raw["model"], REPO)
    engine_cfg = EngineConfig.from_mapping(raw)
    if engine_cfg.is_auto:
        raise SeesawError("plan=auto needs a batch known up front: name a plan to serve")
    if _launch_rank() != 0:
        # rank 0 decides when the job stops: a launcher's SIGTERM reaches every rank
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    from seesaw_mcore.async_llm import AsyncLLM

    llm = AsyncLLM(config=engine_cfg)  # other ranks: return when rank 0 shuts down
    if not llm.is_driver:
        llm.shutdown()
        return 0
    try:
        sock = _bind(server_cfg.host, server_cfg.port)
    except SeesawError:
        llm.shutdown()
        raise
    try:
        return asyncio.run(_serve(llm, server_cfg, engine_cfg, sock))
    finally:
        llm.shutdown()


def _launch_rank() -> int:
    """This process's rank as its launcher set it (before the process group exists)."""
    from seesaw_mcore.runtime.cluster import in_srun_step

    if in_srun_step():
        return int(os.environ["SLURM_PROCID"])
    return int(os.environ.get("RANK", "0"))


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SeesawError(f"server cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


async def _serve(llm, server_cfg: ServerConfig, engine_cfg: EngineConfig,
                 sock: socket.socket) -> int:
    import uvicorn

    from seesaw_mcore.serving.app import build_app

    _Http = _http_server()

    path = engine_cfg.model.path
    name = server_cfg.served_model_name or os.path.basename(os.path.normpath(path))
    app, server = build_app(llm, server_cfg, name, path)
    lora = engine_cfg.lora
    if lora.path:  # served as model=<name> from the start
        from seesaw_mcore.serving.lora import load_adapter

        await load_adapter(server, lora.name or os.path.basename(os.path.normpath(lora.path)),
                           lora.path)
    config = uvicorn.Config(app, log_level=server_cfg.log_level, access_log=False,
                            timeout_graceful_shutdown=server_cfg.shutdown_timeout_s,
                            timeout_keep_alive=30)
    http = _Http(config)
    failed = False

    async def watch() -> None:
        nonlocal failed
        while True:
            if http.should_exit:  # SIGTERM: new requests get 503 from now on
                server.stopping = True
            if llm.errored and not failed:  # the engine failed: stop, exit non-zero
                failed = http.should_exit = True
            await asyncio.sleep(0.1)

    async def announce() -> None:
        while not http.started:
            await asyncio.sleep(0.05)
        host, port = sock.getsockname()[:2]
        print(f"serving {name} on http://{host}:{port} (plan {llm.engine.plan}, "
              f"{llm.engine.dtype}, max_model_len {llm.engine.max_model_len})", flush=True)

    watcher = asyncio.ensure_future(watch())
    announcer = asyncio.ensure_future(announce())
    try:
        await http.serve(sockets=[sock])
    finally:
        server.stopping = True
        watcher.cancel()
        announcer.cancel()
    if failed:
        print(f"error: the engine failed: {llm.error}", file=sys.stderr, flush=True)
        return 1
    aborted = llm.num_requests
    print(f"server stopped{f'; aborted {aborted} requests in flight' if aborted else ''}",
          flush=True)
    return 0


def _http_server():
    import uvicorn

    class Http(uvicorn.Server):
        """uvicorn's server, but a SIGTERM / SIGINT only stops it: the exit status is this
        job's (uvicorn re-raises the signal after its graceful shutdown)."""

        @contextlib.contextmanager
        def capture_signals(self):
            old = {s: signal.signal(s, self.handle_exit) for s in (signal.SIGTERM,
                                                                   signal.SIGINT)}
            try:
                yield
            finally:
                for s, handler in old.items():
                    signal.signal(s, handler)

    return Http


@hydra.main(version_base="1.3", config_path="../conf", config_name="serve")
def main(cfg: DictConfig) -> None:
    sys.exit(exit_status(lambda: run(cfg)))


if __name__ == "__main__":
    main()
