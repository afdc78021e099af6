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

from softgate.settings import host_port

# loopback for a wildcard address: for `::`, ::1 and then 127.0.0.1, which a dual-stack
# listener answers where IPv6 is off in the container
_WILDCARDS = {"0.0.0.0": ["127.0.0.1"], "": ["127.0.0.1"], "::": ["::1", "127.0.0.1"]}


def write_status(path: str, grpc: tuple[str, int], admin: tuple[str, int] | None) -> None:
    """Record this process's bound gRPC and admin (host, port) in `path` (atomically)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    body = {"pid": os.getpid(), "grpc": list(grpc), "admin": list(admin) if admin else None}
    Path(tmp).write_text(json.dumps(body))
    try:
        os.replace(tmp, path)
    except OSError:  # (a directory at `path`: the temporary file was left behind; an audit)
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def remove_status(path: str) -> None:
    """Remove `path` when this process wrote it (a newer server's file is left alone)."""
    with contextlib.suppress(OSError, ValueError):
        if json.loads(Path(path).read_text())["pid"] == os.getpid():
            os.remove(path)


def _local(host: str) -> list[str]:
    """Hosts to reach a listener bound to `host` from this machine, in order."""
    host = host.strip("[]")
    return _WILDCARDS.get(host, [host])


def _healthz(host: str, port: int, timeout: float) -> str | None:
    """None when the admin server at host:port answers /healthz with 200, else why not."""
    url = f"http://{host_port(host, port)}/healthz"
    try:
        # never through http_proxy / HTTP_PROXY, where they are set: the server is on this
        # host (the images' HEALTHCHECK called a healthy server unhealthy; an audit)
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=timeout) as r:
            return None if r.status == 200 else f"{url} answered {r.status}"
    except OSError as e:  # (URLError and HTTPError among them)
        return f"{url}: {e}"


def _accepts(host: str, port: int, timeout: float) -> str | None:
    """None when host:port accepts a TCP connection (the gRPC port, admin off), else why not."""
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return None
    except OSError as e:
        return f"gRPC {host}:{port} (admin off): {e}"


def check(path: str, timeout: float = 2.0) -> str | None:
    """None when the server of status file `path` is alive and answering, else why not."""
    try:
        status = json.loads(Path(path).read_text())
        pid = int(status["pid"])
        probe, (host, port) = (
            (_healthz, status["admin"]) if status.get("admin") else (_accepts, status["grpc"])
        )
    except FileNotFoundError:
        return f"no status file {path}: the server has not bound its ports yet, or has exited"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable status file {path}: {e!r}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return f"the server that wrote {path} (pid {pid}) is gone"
    except PermissionError:  # alive, another user's
        pass
    problem = None
    for h in _local(host):
        if (problem := probe(h, int(port), timeout)) is None:
            return None
    return problem
