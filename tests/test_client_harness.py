"""Client-test harness (no tests here): a real softgate gRPC server (grpc.aio + LossServicer + CPU Engine) on a loopback port,
in a background thread, for the client tests. The servicer is registered as `softgate serve`
registers it (`loss_service_handler`: the raw request reader with its zero-copy views, the
hand-encoded responses). Optional TLS / mTLS and server interceptors."""

from __future__ import annotations

import asyncio
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from softgate.engine import Engine
from softgate.grpc.server import loss_service_handler
from softgate.grpc.servicer import LossServicer

ENGINE: Engine | None = None


def engine() -> Engine:
    """One CPU engine shared by the in-process reference and every test server."""
    global ENGINE
    if ENGINE is None:
        ENGINE = Engine(device="cpu", compile=False)
    return ENGINE


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """Start with `.start()`, stop with `.stop()`; `.port` is the bound loopback port."""

    def __init__(
        self,
        port: int = 0,
        *,
        server_credentials: grpc.ServerCredentials | None = None,
        interceptors: list[Any] | None = None,
        max_message_bytes: int = 512 << 20,
    ) -> None:
        self.port = port
        self.server_credentials = server_credentials
        self.interceptors = interceptors or []
        self.max_message_bytes = max_message_bytes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._executor = ThreadPoolExecutor(2)

    def start(self) -> ServerThread:
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._thread.start()
        if not self._ready.wait(60):
            raise TimeoutError("test server did not start")
        if self._error is not None:
            raise self._error
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # surfaced by start()
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()

    async def _serve(self) -> None:
        opts = [
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        server = grpc.aio.server(interceptors=self.interceptors, options=opts)
        servicer = LossServicer(engine(), self._executor, max_message_bytes=self.max_message_bytes)
        server.add_generic_rpc_handlers((loss_service_handler(servicer),))
        addr = f"127.0.0.1:{self.port}"
        if self.server_credentials is not None:
            self.port = server.add_secure_port(addr, self.server_credentials)
        else:
            self.port = server.add_insecure_port(addr)
        await server.start()
        self._server = server

    def stop(self) -> None:
        if self._loop is None:
            return
        if self._server is not None:
            fut = asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop)
            fut.result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(30)
        self._executor.shutdown(wait=False)
        self._loop = None  # (a second stop does nothing)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
