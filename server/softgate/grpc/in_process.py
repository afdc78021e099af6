"""softgate's gRPC server in the caller's process: the server `softgate serve` runs, on a free
loopback port, its asyncio loop in a background thread. A trainer gets the client API
(`SoftgateClient`, `softgate_loss`) with no server to deploy, and every result bit for bit
the served one:

    with in_process_server() as target:
        client = SoftgateClient(target)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from softgate.engine import Engine
from softgate.grpc.server import GrpcServer
from softgate.serve import make_engine
from softgate.settings import Settings


@contextlib.contextmanager
def in_process_server(engine: Engine | None = None, **settings: Any) -> Iterator[str]:
    """Serve `engine` on 127.0.0.1:<free port> until the block ends; yields the target.
    `settings` are `Settings` fields (e.g. max_message_bytes); without `engine`, the engine
    `softgate serve` would build from them (default: CPU, eager)."""
    settings = {
        "grpc_host": "127.0.0.1",
        "grpc_port": 0,
        "admin_port": None,
        "device": "cpu",
        "compile": False,
        **settings,
    }
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="softgate-in-process", daemon=True)
    thread.start()

    def call(coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    s = Settings(**settings)
    server = GrpcServer(s, engine or make_engine(s))
    try:
        port = call(server.start())
        call(server.set_serving(True))
        yield f"127.0.0.1:{port}"
    finally:
        with contextlib.suppress(Exception):
            call(server.stop(0.5))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
