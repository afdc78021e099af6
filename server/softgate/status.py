"""The status file: where a running `softgate serve` listens, for `softgate health`.

A container's health check cannot see the flags or config file the server was started with,
only the image's environment: with `status_file` set (the images set
SOFTGATE_STATUS_FILE), the server writes the addresses it bound there as JSON once both
listeners are up, and removes it at exit; `softgate health` reads it and asks the admin
`/healthz` (or, with the admin server off, connects to the gRPC port).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import urllib.request
from pathlib import Path

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def write_status(path: str, grpc: tuple[str, int], admin: tuple[str, int] | None) -> None:
    """Record this process's bound gRPC and admin (host, port) in `path` (atomically)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    body = {"pid": os.getpid(), "grpc": list(grpc), "admin": list(admin) if admin else None}
    Path(tmp).write_text(json.dumps(body))
    os.replace(tmp, path)


def remove_status(path: str) -> None:
    """Remove `path` when this process wrote it (a newer server's file is left alone)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(Path(path).read_text())["pid"] == os.getpid():
            os.remove(path)


def _local(host: str) -> list[str]:
    """Hosts to reach a listener bound to `host` from this machine: loopback for a wildcard
    (for `::`, ::1 and then 127.0.0.1, which a dual-stack listener answers where IPv6 is off)."""
    host = host.strip("[]")
    if host == "::":
        return ["::1", "127.0.0.1"]
    return [_WILDCARDS.get(host, host)]


def check(path: str, timeout: float = 2.0) -> str | None:
    """None when the server of status file `path` is alive and answering, else why not."""
    try:
        status = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return f"no status file {path}: the server has not bound its ports yet, or has exited"
    except (OSError, ValueError) as e:
        return f"unreadable status file {path}: {e}"
    try:
        os.kill(int(status["pid"]), 0)
    except ProcessLookupError:
        return f"the server that wrote {path} (pid {status['pid']}) is gone"
    except PermissionError:  # alive, another user's
        pass
    problem = ""
    if status.get("admin"):
        host, port = status["admin"]
        for h in _local(host):
            url = f"http://{f'[{h}]' if ':' in h else h}:{port}/healthz"
            try:
                with urllib.request.urlopen(url, timeout=timeout) as r:
                    if r.status == 200:
                        return None
                    problem = f"{url} answered {r.status}"
            except OSError as e:  # (URLError and HTTPError among them)
                problem = f"{url}: {e}"
        return problem
    host, port = status["grpc"]
    for h in _local(host):
        try:
            socket.create_connection((h, int(port)), timeout=timeout).close()
            return None
        except OSError as e:
            problem = f"gRPC {h}:{port} (admin off): {e}"
    return problem
