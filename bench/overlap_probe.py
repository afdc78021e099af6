"""Would computing a streamed call's chunks as they arrive hide the engine behind the transport?

A bound for a design, not a benchmark of softgate's server: one process serves four raw-bytes
streams (no protobuf, no servicer), each fed the end-to-end bench's 16M-token SAPO batch in
`--chunk-bytes` chunks (three float32 inputs in, the float32 gradient out), the engine
compiled, tcmalloc preloaded into both processes when installed:

- echo: each chunk's first 4 n bytes back (bench/echo_server.py's Stream);
- after: every chunk received, then one engine call over the concatenated batch, then the
  replies: what StreamLoss does;
- overlap: each chunk computed in a worker thread as soon as it arrives, the replies sent once
  the last chunk is in;
- pipelined: as overlap, each chunk's reply sent as soon as it is computed.

Every chunk is computed with the batch's global normaliser (aggregation.num_seqs), so the
chunked gradients must equal the whole batch's bit for bit; the probe checks that first.

    python bench/overlap_probe.py                      # 16M tokens, 32 MiB chunks, 8 rounds
    python bench/overlap_probe.py --chunk-bytes 8388608 --rounds 4

Prints each stream's median, its share of the echo's throughput (echo / stream) and the CPU
time the server and the client used in a call (medians; /proc, 10 ms ticks).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2e_bench import ALLOCATORS, SEQ_LEN, find_lib, free_port, make_batch

SERVICE = "softgate.bench.v1.Overlap"
STREAMS = ("echo", "after", "overlap", "pipelined")
HEAD = 8  # a chunk: its token count (8 bytes, little-endian), then logp, old_logp, advantages


def serve(port: int, ready: str, total_seqs: int, sizes: list[int]) -> None:
    """The four streams on 127.0.0.1:`port`; writes `ready` once every chunk size is compiled."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    import torch
    from softgate.engine import AggregationConfig, Batch, Engine, LossConfig
    from softgate.observability.telemetry import DEFAULT_CPU_SAMPLE_TOKENS

    torch.set_grad_enabled(False)
    engine = Engine(device="cpu", compile=True)
    config = LossConfig(aggregation=AggregationConfig(num_seqs=float(total_seqs)))
    pool = ThreadPoolExecutor(1)  # one engine call at a time, as a server's worker

    def compute(inputs: tuple[torch.Tensor, ...]) -> bytes:
        logp, old, adv = inputs
        n = logp.numel()
        offsets = torch.arange(0, n + SEQ_LEN, SEQ_LEN).clamp(max=n)
        batch = Batch(logp=logp, old_logp=old, advantages=adv, offsets=offsets.unique_consecutive())
        out = bytearray(4 * n)
        grad = torch.frombuffer(out, dtype=torch.float32) if n else torch.empty(0)
        engine.loss(batch, config, sample_tokens=DEFAULT_CPU_SAMPLE_TOKENS, grad_out=grad)
        return bytes(out)

    def split(msg: bytes) -> tuple[torch.Tensor, ...]:
        n = int.from_bytes(msg[:HEAD], "little")
        with warnings.catch_warnings():  # (read-only bytes: the engine only reads them)
            warnings.simplefilter("ignore", UserWarning)
            t = torch.frombuffer(msg, dtype=torch.float32, offset=HEAD)
        return t[:n], t[n : 2 * n], t[2 * n :]

    async def echo(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        async for msg in requests:
            yield msg[HEAD : HEAD + 4 * int.from_bytes(msg[:HEAD], "little")]

    async def after(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        chunks = [split(msg) async for msg in requests]

        def whole() -> bytes:
            return compute(tuple(torch.cat([c[i] for c in chunks]) for i in range(3)))

        out = await asyncio.get_running_loop().run_in_executor(pool, whole)
        start = 0
        for c in chunks:
            yield out[4 * start : 4 * (start + c[0].numel())]
            start += c[0].numel()

    async def overlap(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        futures = [loop.run_in_executor(pool, compute, split(msg)) async for msg in requests]
        for f in futures:
            yield await f

    async def pipelined(requests: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()

        async def read() -> None:
            async for msg in requests:
                queue.put_nowait(loop.run_in_executor(pool, compute, split(msg)))
            queue.put_nowait(None)

        reader = asyncio.ensure_future(read())
        while (f := await queue.get()) is not None:
            yield await f
        await reader

    def ident(b: bytes) -> bytes:
        return b

    handlers: dict[str, Callable[..., Any]] = {
        "echo": echo,
        "after": after,
        "overlap": overlap,
        "pipelined": pipelined,
    }
    generic = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            k: grpc.stream_stream_rpc_method_handler(f, request_deserializer=ident, response_serializer=ident)
            for k, f in handlers.items()
        },
    )

    async def main() -> None:
        opts = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
        server = grpc.aio.server(options=opts)
        server.add_generic_rpc_handlers((generic,))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        for n in sizes:  # compiled before timing (one kernel for every size; the first waits)
            x = torch.full((n,), -1.0)
            compute((x, x, x))
        engine.wait_compiled(600)
        Path(ready).write_text("ready")
        await server.wait_for_termination()

    asyncio.run(main())


def chunks(b: dict[str, np.ndarray], tokens: int) -> Iterator[bytes]:
    """The batch as the streams' messages of at most `tokens` tokens (whole sequences), each
    built as gRPC asks for it with one join of the arrays' memory (as e2e_bench's EchoClient)."""
    n = b["logp"].shape[0]
    for s in range(0, n, tokens):
        e = min(n, s + tokens)
        parts = [memoryview(b[k][s:e]).cast("B") for k in ("logp", "old_logp", "advantages")]
        yield b"".join([(e - s).to_bytes(HEAD, "little"), *parts])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=16 * 1024 * 1024)
    ap.add_argument("--chunk-bytes", type=int, default=32 * 1024 * 1024, help="request bytes a chunk")
    ap.add_argument("--rounds", type=int, default=8, help="timed calls of each stream")
    ap.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        port, ready, seqs, sizes = args.serve
        serve(int(port), ready, int(seqs), [int(s) for s in sizes.split(",")])
        return
    if args.tokens < SEQ_LEN or args.chunk_bytes < 12 * SEQ_LEN or args.rounds < 1:
        ap.error(f"expected --tokens >= {SEQ_LEN}, --chunk-bytes >= {12 * SEQ_LEN}, --rounds >= 1")
    tcmalloc = find_lib(ALLOCATORS["tcmalloc"][1])  # type: ignore[index]
    if tcmalloc and tcmalloc not in os.environ.get("LD_PRELOAD", ""):  # client and server alike
        env = dict(os.environ, LD_PRELOAD=tcmalloc, TCMALLOC_RELEASE_RATE="0")
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    import grpc

    b = make_batch(args.tokens)
    per_chunk = args.chunk_bytes // 12 // SEQ_LEN * SEQ_LEN
    sizes = sorted({per_chunk, args.tokens % per_chunk or per_chunk, args.tokens})
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        ready = os.path.join(tmp, "ready")
        seqs = len(b["lengths"])
        cmd = [sys.executable, __file__, "--serve", str(port), ready, str(seqs), ",".join(map(str, sizes))]
        server = subprocess.Popen(cmd)
        try:
            while not os.path.exists(ready):
                if server.poll() is not None:
                    sys.exit(f"the probe's server exited {server.returncode}")
                time.sleep(0.2)
            opts = [("grpc.max_send_message_length", 1 << 30), ("grpc.max_receive_message_length", 1 << 30)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=opts) as ch:
                run(ch, b, per_chunk, args.rounds, tcmalloc, server.pid)
        finally:
            server.terminate()
            server.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process `pid` has used (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(
    ch: Any, b: dict[str, np.ndarray], per_chunk: int, rounds: int, tcmalloc: str | None, server: int
) -> None:
    stubs = {k: ch.stream_stream(f"/{SERVICE}/{k}") for k in STREAMS}

    def call(k: str) -> bytes:
        return b"".join(stubs[k](chunks(b, per_chunk)))

    grads = {k: call(k) for k in STREAMS}  # untimed: first touch of every buffer
    n = b["logp"].shape[0]
    print(f"{n} tokens in {-(-n // per_chunk)} chunks of <= {per_chunk}; allocator {tcmalloc or 'glibc'}")
    for k in ("overlap", "pipelined"):
        same = grads[k] == grads["after"]
        diff = np.abs(np.frombuffer(grads[k], np.float32) - np.frombuffer(grads["after"], np.float32)).max()
        print(f"{k} gradient vs after: {'bit-equal' if same else f'max |diff| {diff:.3g}'}")
    times: dict[str, list[float]] = {k: [] for k in STREAMS}
    cpu: dict[str, list[tuple[float, float]]] = {k: [] for k in STREAMS}  # (server, client) s
    for r in range(rounds):
        for k in STREAMS if r % 2 == 0 else STREAMS[::-1]:  # each stream first and last alike
            time.sleep(0.05)
            s0, c0 = cpu_seconds(server), cpu_seconds(os.getpid())
            t = time.perf_counter()
            call(k)
            times[k].append(time.perf_counter() - t)
            cpu[k].append((cpu_seconds(server) - s0, cpu_seconds(os.getpid()) - c0))
    echo = statistics.median(times["echo"])
    # CPU time in a call, both processes: with 2 cores, the echo's own transport leaves room
    # for the engine only where the two together stay below 2 x the call's time
    print(
        f"| stream | median ms | min ms | share of echo | server / client CPU ms (of {os.cpu_count()} cores) |"
    )
    print("|---|---:|---:|---:|---:|")
    for k, ts in times.items():
        m = statistics.median(ts)
        srv, cli = (statistics.median(c[i] for c in cpu[k]) * 1e3 for i in (0, 1))
        print(
            f"| {k} | {m * 1e3:.1f} | {min(ts) * 1e3:.1f} | {100 * echo / m:.1f}% | {srv:.0f} / {cli:.0f} |"
        )


if __name__ == "__main__":
    main()
