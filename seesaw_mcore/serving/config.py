"""The server's settings (Hydra group ``server``, ``launch/serve.py``)."""

from __future__ import annotations

from dataclasses import dataclass

from seesaw_mcore.errors import SeesawError


@dataclass
class ServerConfig:
    """Where and how the HTTP front-end listens.

    Attributes:
        host: the address to bind (``127.0.0.1``: this machine only; ``0.0.0.0``: every
            interface, e.g. a Slurm node other jobs reach).
        port: the TCP port (0: a free one, printed in the ``serving ...`` line).
        api_key: when set, every endpoint but ``/health`` and ``/metrics`` needs
            ``Authorization: Bearer <api_key>`` (else HTTP 401).
        served_model_name: the ``model`` name clients send and responses carry (default:
            the model folder's name).
        max_queued_requests: requests waiting for the engine (not yet admitted) beyond
            which a new one is refused at once with HTTP 503.
        shutdown_timeout_s: on SIGTERM, how long requests in flight may take to finish
            before they are aborted (with what they have) and the server exits 0.
        log_level: uvicorn's log level (``warning``: no line per request).
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    served_model_name: str | None = None
    max_queued_requests: int = 4096
    shutdown_timeout_s: float = 30.0
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise SeesawError(f"server.port must be 0..65535, got {self.port!r}")
        if not isinstance(self.max_queued_requests, int) or self.max_queued_requests < 1:
            raise SeesawError(f"server.max_queued_requests must be >= 1, got "
                              f"{self.max_queued_requests!r}")
        if not self.shutdown_timeout_s >= 0:
            raise SeesawError(f"server.shutdown_timeout_s must be >= 0, got "
                              f"{self.shutdown_timeout_s!r}")
        levels = ("critical", "error", "warning", "info", "debug", "trace")
        if self.log_level not in levels:
            raise SeesawError(f"server.log_level must be one of {', '.join(levels)}, got "
                              f"{self.log_level!r}")
        if self.api_key is not None and not str(self.api_key):
            raise SeesawError("server.api_key must not be empty (leave it unset for none)")
