"""`softgate serve` shutdown with the engine's background torch.compile still running."""

from __future__ import annotations

import pytest
from softgate.settings import Settings


def test_exit_does_not_wait_forever_for_a_background_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compile thread still running at interpreter exit aborts the process (std::terminate):
    serve waits a bounded time for it, then asks run() for an immediate exit."""
    import asyncio

    import softgate.serve as serve
    from softgate.engine import Engine

    waited: list[float | None] = []

    class Compiling(Engine):
        def wait_compiled(self, timeout: float | None = None) -> bool:
            waited.append(timeout)
            return False  # still compiling after the wait

    monkeypatch.setattr(serve, "make_engine", lambda s: Compiling(device="cpu", compile=False))
    monkeypatch.setitem(serve._exit_now, "hard", False)
    settings = Settings(grpc_host="127.0.0.1", grpc_port=0, admin_port=None, device="cpu", warmup=False)

    async def go() -> int:
        stop = asyncio.Event()
        stop.set()
        return await serve.serve(settings, stop=stop)

    assert asyncio.run(go()) == 0
    assert waited == [serve.COMPILE_EXIT_WAIT_S] and serve._exit_now["hard"] is True


def test_run_serves_with_grad_off_and_restores_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """`run` serves with autograd off in its thread (the engine then skips its no_grad
    contexts) and leaves an embedding caller's grad mode as it found it."""
    import softgate.serve as serve
    import torch

    seen: list[bool] = []

    async def fake_serve(settings: Settings) -> int:
        seen.append(torch.is_grad_enabled())
        return 0

    monkeypatch.setattr(serve, "serve", fake_serve)
    monkeypatch.setattr(serve, "configure", lambda *a: None)  # (the test process's logging stays)
    settings = Settings(grpc_host="127.0.0.1", grpc_port=0, admin_port=None, device="cpu", warmup=False)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            assert serve.run(settings) == 0
            assert torch.is_grad_enabled() is grad
    assert seen == [False, False]


def test_an_admin_port_in_use_fails_start_up_with_exit_code_1() -> None:
    """uvicorn ends a failed bind with sys.exit(3) in its task, which escaped asyncio.run; serve
    binds the admin socket itself and reports the failure like the gRPC port's."""
    import asyncio
    import socket

    import softgate.serve as serve

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        settings = Settings(
            grpc_host="127.0.0.1",
            grpc_port=0,
            admin_host="127.0.0.1",
            admin_port=sock.getsockname()[1],
            device="cpu",
            compile=False,
            warmup=False,
        )
        assert asyncio.run(serve.serve(settings)) == 1
