"""Where a small call's time goes, end to end: the echo server and softgate's server with
layers taken away, all up at once, called in rotating blocks of 25 calls, so that load from
other processes hits every row alike; the rotation's order is shuffled every round (a fixed
order made the second of two identical servers 0.12 ms slower). Each row is the median over
the echo's median.

    python bench/latency_ladder.py                     # 4096 tokens, 40 rounds (~2 min)
    python bench/latency_ladder.py --tokens 65536 --rounds 20
    python bench/latency_ladder.py --device cuda       # the engine on the GPU (bench/device_check.sh ladder)
    python bench/latency_ladder.py --against f00bff0   # + `softgate serve` of that revision (a git worktree)
    python bench/latency_ladder.py --tokens 16777216 --rungs serve --block 1 --rounds 12 --against f00bff0

Rows (the same SAPO call through SoftgateClient as bench/e2e_bench.py, tcmalloc preloaded
when installed, as `softgate serve` runs):
- raw: the replay server below, sent the bytes SoftgateClient sends (built once), with its
  metadata and timeout, and its response left as bytes: softgate's message sizes and metadata
  without the client's Python.
- replay: ComputeLoss answers with bytes it answered before, called through SoftgateClient:
  + the client's Python (packing, encoding, parsing, the result).
- admission: + the servicer's ComputeLoss around a `_loss` that answers what it answered
  before: admission, the deadline, the inline run, the accounting (no decoding).
- decode: + decoding the batch and configuration (the engine returns a result it computed
  before; the response is the one encoded first).
- cached-notelemetry: + encoding the response: the whole servicer and codec.
- notelemetry: + the compiled engine.
- serve: `softgate serve --compile`: + the telemetry it records.
Each row adds one layer to the row above; the difference between them is what it costs.
- serve@REV (`--against REV`): `softgate serve` of revision REV, called by this tree's client;
  its difference to the row above is what this tree's server changed, in the same run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import e2e_bench as E  # noqa: E402

RUNGS = ("raw", "replay", "admission", "decode", "cached-notelemetry", "notelemetry", "serve")
BLOCK = 25


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--device", default="cpu", help="the servers' engine device (cpu, cuda, cuda:N)")
    ap.add_argument("--against", metavar="REV", help="also a `softgate serve` of this git revision")
    ap.add_argument(
        "--rungs", default=",".join(RUNGS), help="comma-separated subset of the rows (default: all)"
    )
    ap.add_argument("--block", type=int, default=BLOCK, help="calls of a row in a row (default 25)")
    args = ap.parse_args()
    unknown = sorted(set(args.rungs.split(",")) - set(RUNGS))
    if unknown:  # (a misspelt one measured the echo alone: an audit)
        ap.error(f"--rungs: unknown {', '.join(map(repr, unknown))}; the rows are {', '.join(RUNGS)}")
    rungs = [r for r in RUNGS if r in args.rungs.split(",")]
    E.exit_on_sigterm()
    from softgate_client import SoftgateClient

    limit = 512 * E.MiB
    env = E.env_with(E.find_lib(["libtcmalloc_minimal.so.4"]))
    procs: list[subprocess.Popen[bytes]] = []
    worktree = tempfile.mkdtemp(prefix="softgate-against-") if args.against else None
    try:
        echo_port = E.free_port()
        echo_cmd = [sys.executable, str(ROOT / "bench" / "echo_server.py"), "--port", str(echo_port)]
        procs.append(
            subprocess.Popen(
                [*echo_cmd, "--max-message-bytes", str(limit)], env=env, stdout=subprocess.DEVNULL
            )
        )
        E.wait_port(echo_port, procs[-1])
        ports = {}
        for rung in rungs:
            if rung == "raw":  # a client of the replay server (started for it when not a row)
                continue
            ports[rung] = port = E.free_port()
            if rung == "serve":
                procs.append(E._softgate_serve(port, limit, "true", args.device, env))
            else:
                cmd = [sys.executable, E.__file__, "--serve-variant", f"{port}:{limit}:{rung}:{args.device}"]
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
            E.wait_port(port, procs[-1])
            E.wait_serving(port, procs[-1])
        if worktree:
            git = ["git", "-C", str(ROOT), "worktree"]
            subprocess.run([*git, "add", "--detach", worktree, args.against], check=True, capture_output=True)
            path = f"{worktree}/server{os.pathsep}{worktree}/client"
            ports[f"serve@{args.against}"] = port = E.free_port()
            procs.append(E._softgate_serve(port, limit, "true", args.device, {**env, "PYTHONPATH": path}))
            E.wait_port(port, procs[-1])
            E.wait_serving(port, procs[-1])
        b = E.make_batch(args.tokens)
        echo = E.EchoClient(echo_port, limit, limit, limit)
        calls: dict[str, Any] = {"echo": lambda: echo.call(b)}
        if "raw" in rungs:
            port = ports.get("replay") or E.free_port()
            if "replay" not in ports:
                cmd = [sys.executable, E.__file__, "--serve-variant", f"{port}:{limit}:replay:{args.device}"]
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL))
                E.wait_port(port, procs[-1])
                E.wait_serving(port, procs[-1])
            calls["raw"] = raw_call(port, limit, b)
        for rung, port in ports.items():
            sg = SoftgateClient(f"127.0.0.1:{port}", run="ladder", timeout=600, max_message_bytes=limit)
            calls[rung] = lambda sg=sg: E.sapo_loss(sg, b)
        for call in calls.values():  # first touches, the inline path's streak, compiles
            for _ in range(200 if args.tokens <= 1 << 16 else 3):
                call()
        times: dict[str, list[float]] = {k: [] for k in calls}
        rng = random.Random(0)
        for _ in range(args.rounds):
            order = list(calls.items())
            rng.shuffle(order)
            for name, call in order:
                for _ in range(args.block):
                    t0 = time.perf_counter()
                    call()
                    times[name].append(time.perf_counter() - t0)
                time.sleep(E.SETTLE_S)  # what a server defers past its block runs before the next
    finally:
        E.stop(procs)
        if worktree:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", worktree], capture_output=True
            )
            shutil.rmtree(worktree, ignore_errors=True)
    echo_ms = statistics.median(times["echo"]) * 1e3
    print(f"{args.tokens} tokens, engine on {args.device}, {args.rounds} rounds of {args.block} calls each")
    print("| server | median ms | over echo ms | over the row above ms |")
    print("|---|---:|---:|---:|")
    prev = echo_ms
    for name, ts in times.items():
        ms = statistics.median(ts) * 1e3
        print(f"| {name} | {ms:.3f} | {ms - echo_ms:+.3f} | {ms - prev:+.3f} |")
        prev = ms


def raw_call(port: int, limit: int, b: dict[str, Any]) -> Any:
    """A call of the replay server at `port` with the bytes, metadata and timeout SoftgateClient
    sends for batch `b` in a unary call (encoded once, here), the response left as bytes."""
    import grpc
    from softgate_client import SoftgateClient, client

    sg = SoftgateClient(f"127.0.0.1:{port}", run="ladder", timeout=600, max_message_bytes=limit)
    sent: list[bytes] = []

    def encode(pieces: Any) -> bytes:
        sent.append(pieces.join())
        return sent[-1]

    sg._compute_loss = sg._channel.unary_unary(  # (one call, to capture its request bytes)
        f"/{client.SERVICE}/ComputeLoss",
        request_serializer=encode,
        response_deserializer=client._parse_loss_response,
    )
    E.sapo_loss(sg, b, stream=False)
    request, metadata = sent[0], sg._metadata(None)
    sg.close()
    channel = grpc.insecure_channel(
        f"127.0.0.1:{port}",
        options=[("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)],
    )
    call = channel.unary_unary(f"/{client.SERVICE}/ComputeLoss")
    return lambda: call(request, timeout=600, metadata=metadata)


if __name__ == "__main__":
    main()
