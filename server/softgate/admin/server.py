"""Running the admin app outside `softgate serve`: a uvicorn server on a background thread
(tests, notebooks, embedding softgate's engine in a trainer process). `softgate serve`
itself runs the app in its own event loop instead; both guard its connections
(`guard_connections`)."""

from __future__ import annotations

import threading
import time
from typing import Any

import uvicorn

from softgate.logging import quiet_uvicorn_noise
from softgate.settings import bind_tcp, host_port

# A connection that has not sent a whole request's headers this long after it opened, or
# after its last response, is closed; and at most MAX_CONNECTIONS are open at once, later ones
# closed when accepted. uvicorn times a connection out only after a response: 400 silent
# connections used up a 256-descriptor process and took its gRPC port down too (an audit).
HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 128


def guard_connections(config: uvicorn.Config) -> uvicorn.Config:
    """`config`, loaded, its HTTP protocol closing connections that stall before a request's
    headers are whole (HEADER_TIMEOUT_S) or that exceed MAX_CONNECTIONS."""
    if not config.loaded:
        config.load()
    base: Any = config.http_protocol_class

    class Guarded(base):  # type: ignore[misc, valid-type]
        _deadline: Any = None

        def _arm(self) -> None:
            # closed unless a request (a new cycle: its headers whole) started in the meantime,
            # or the one current now (pipelined behind the last) is still being answered
            if self._deadline is not None:
                self._deadline.cancel()
            cycle = self.cycle

            def expire() -> None:
                if self.cycle is cycle and (cycle is None or cycle.response_complete):
                    self.transport.close()

            self._deadline = self.loop.call_later(HEADER_TIMEOUT_S, expire)

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > MAX_CONNECTIONS:
                transport.close()
            else:
                self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    config.http_protocol_class = Guarded
    return config


class ThreadedAdminServer:
    """`with ThreadedAdminServer(app) as srv: httpx.get(srv.url + "/healthz")`. The port is
    bound when the server is made (port 0: a free one, read back as `.port`)."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning") -> None:
        # bound once, here: picking a free port and binding it again in uvicorn left a race
        # between two servers starting at once, and knew IPv4 only (an audit)
        self.socket = bind_tcp(host, port, "the admin server")
        self.host = host
        self.port = int(self.socket.getsockname()[1])
        config = uvicorn.Config(
            app, host=host, port=self.port, log_level=log_level, lifespan="off", access_log=False
        )
        quiet_uvicorn_noise()  # (after Config, which sets up uvicorn's loggers)
        self.server = uvicorn.Server(guard_connections(config))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.socket]}, name="softgate-admin", daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://{host_port(self.host or '127.0.0.1', self.port)}"  # "": every address

    def start(self, timeout: float = 10.0) -> ThreadedAdminServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()  # (a late start would serve on, its port held; an audit)
                raise RuntimeError(f"admin server did not start on {self.url}")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)
        self.socket.close()  # (uvicorn closes it when it ran; a server never started holds it)

    def __enter__(self) -> ThreadedAdminServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
