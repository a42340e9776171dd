"""`lmforge serve RUN`: load the model, start the engine, serve HTTP with uvicorn until a signal.

The socket is bound here, before uvicorn starts, so that `--port 0` (any free port) works and the
line printed when the server is ready names the port it really listens on. SIGINT and SIGTERM stop
the server gracefully (requests in flight finish, for up to GRACE_S seconds), then the command
returns normally: exit code 0.
"""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from types import FrameType

import uvicorn

from lmforge.api import load_checkpoint
from lmforge.errors import ConfigError
from lmforge.models import spec_of
from lmforge.rundir import resolve_checkpoint, run_precision
from lmforge.runtime import resolve_device
from lmforge.serve.app import build_app
from lmforge.serve.engine import Engine

GRACE_S = 10  # seconds a stop waits for requests in flight


def model_id(run: str | Path) -> str:
    """The name the server gives the model: the run directory's name (also when a checkpoint
    directory inside it is served)."""
    path = Path(run).resolve()
    return path.parent.parent.name if path.parent.name == "checkpoints" else path.name


def serve(
    run: str, host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16, device: str = "auto",
    compile: bool = False,
) -> None:  # fmt: skip
    """Serve RUN's model on http://HOST:PORT/v1 until SIGINT or SIGTERM (see the CLI's help)."""
    if max_batch < 1:
        raise ConfigError(f"--max-batch must be >= 1, got {max_batch}")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port must be in [0, 65535], got {port}")
    ckpt_dir = resolve_checkpoint(run)
    dev = resolve_device(device)
    model, tokenizer = load_checkpoint(ckpt_dir, device=dev)
    if spec_of(model).encoder:
        raise ConfigError(
            f"{run} is an encoder (model family {spec_of(model).name}): it does not generate text"
        )
    name = model_id(run)
    engine = Engine(model, tokenizer.decode, max_batch, run_precision(ckpt_dir, dev), compile)
    sock = _listen(host, port)
    bound_port = sock.getsockname()[1]
    url = f"http://{host if ':' not in host else f'[{host}]'}:{bound_port}/v1"

    def ready() -> None:
        print(f"lmforge serve: {name} at {url} (max batch {max_batch}, {dev.type})", flush=True)

    app = build_app(engine, tokenizer, name, on_ready=ready)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACE_S)
    server = uvicorn.Server(config)

    def stop(sig: int, frame: FrameType | None) -> None:
        # uvicorn handles the signals while it runs; it puts these handlers back when it stops and
        # sends the signal again, which then only confirms the stop (no KeyboardInterrupt, no kill).
        server.should_exit = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()


def _listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise ConfigError(f"cannot listen on --host {host}: {err.strerror or err}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on --host {host} --port {port}: {err.strerror or err}") from None
    return sock
