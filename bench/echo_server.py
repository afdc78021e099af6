"""A raw-bytes gRPC echo server: the transport floor that bench/e2e_bench.py compares softgate with.

No protobuf and no compute: a request is an 8-byte little-endian response length followed by
the payload; the reply is the first `length` bytes of the payload (one copy, like a server that
serialises a gradient). `Stream` does the same per message of a bidirectional stream.

    python bench/echo_server.py --port 50061 [--max-message-bytes N]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from collections.abc import AsyncIterator

import grpc

SERVICE = "softgate.bench.v1.Echo"
UNARY = f"/{SERVICE}/Unary"
STREAM = f"/{SERVICE}/Stream"
HEADER = 8


def _reply(request: bytes) -> bytes:
    n = int.from_bytes(request[:HEADER], "little")
    return request[HEADER : HEADER + n]


async def _unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return _reply(request)


async def _stream(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for req in requests:
        yield _reply(req)


def _ident(b: bytes) -> bytes:
    return b


def handler() -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(
                _unary, request_deserializer=_ident, response_serializer=_ident
            ),
            "Stream": grpc.stream_stream_rpc_method_handler(
                _stream, request_deserializer=_ident, response_serializer=_ident
            ),
        },
    )


async def serve(port: int, max_message_bytes: int, ready_file: str | None = None) -> None:
    opts = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]
    server = grpc.aio.server(options=opts)
    server.add_generic_rpc_handlers((handler(),))
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    if ready_file:
        with open(ready_file + ".tmp", "w") as f:
            f.write(str(bound))
        os.replace(ready_file + ".tmp", ready_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0.5)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=0, help="0 = any free port (written to --ready-file)")
    p.add_argument("--max-message-bytes", type=int, default=256 * 1024 * 1024)
    p.add_argument("--ready-file", default=None, help="write the bound port here once serving")
    a = p.parse_args()
    asyncio.run(serve(a.port, a.max_message_bytes, a.ready_file))


if __name__ == "__main__":
    main()
