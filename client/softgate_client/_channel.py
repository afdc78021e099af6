"""Channel construction: message limits, round-robin over every address a DNS name resolves
to (a headless Kubernetes service), TLS / mTLS, keepalive."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import grpc

DEFAULT_PORT = 50051
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # the server default


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE (and, optionally, other codes) with exponential backoff and full
    jitter: attempt k (k >= 1) waits uniform(0, min(max_backoff, initial_backoff * multiplier**(k-1))),
    all within the call's overall timeout. A loss call is a pure function of its request, so
    retrying it is always safe."""

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    # RESOURCE_EXHAUSTED: a server at its concurrency limit (or out of device memory) says so at
    # once; a message over a size limit is never retried (see `retryable`)
    retry_on: tuple[grpc.StatusCode, ...] = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)

    def retryable(self, code: grpc.StatusCode | None, details: str | None) -> bool:
        if code not in self.retry_on:
            return False
        return not (code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in (details or ""))

    def backoff(self, attempt: int) -> float:
        """The upper bound of the wait before retry number `attempt` (1-based)."""
        return float(min(self.max_backoff, self.initial_backoff * self.multiplier ** (attempt - 1)))


def _read(x: bytes | str | os.PathLike[str] | None) -> bytes | None:
    """Certificate material given as bytes (PEM) or as a path to a PEM file."""
    if x is None or isinstance(x, bytes):
        return x
    s = os.fspath(x)
    if "-----BEGIN" in s:
        return s.encode()
    with open(s, "rb") as f:
        return f.read()


def _with_port(hostport: str) -> str:
    """`host` or `[v6]` without a port gets the default port."""
    if hostport.startswith("["):
        return hostport if "]:" in hostport else f"{hostport}:{DEFAULT_PORT}"
    return hostport if ":" in hostport else f"{hostport}:{DEFAULT_PORT}"


def normalise_target(target: str) -> tuple[str, bool]:
    """(target, is_dns_name): a `host` or `dns:///host` without a port gets the default port
    (gRPC's DNS resolver would pick 443); `dns:` targets and host names (not IP literals, not
    `unix:`) are names whose addresses round-robin spreads calls over."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:", "ipv4:", "ipv6:")):
        return t, False
    if t.startswith("dns:"):  # dns:host, dns:///host or dns://authority/host
        head, sep, host = t.rpartition("/") if "/" in t else ("dns", ":", t[4:])
        return head + sep + _with_port(host), True
    t = _with_port(t)
    if t.startswith("["):  # [::1]:50051
        return t, False
    hostname = t.rsplit(":", 1)[0]
    is_ip = hostname.replace(".", "").isdigit() or hostname in ("localhost",)
    return t, not is_ip


def service_config(round_robin: bool) -> dict[str, Any]:
    """The channel's service config. Retries are done by the client's own loop (it also covers
    streamed calls and large messages, which gRPC's transparent retry buffer does not)."""
    cfg: dict[str, Any] = {}
    if round_robin:
        cfg["loadBalancingConfig"] = [{"round_robin": {}}]
    return cfg


def channel_options(
    *, max_message_bytes: int, round_robin: bool, extra: dict[str, Any] | None = None
) -> list[tuple[str, Any]]:
    opts: dict[str, Any] = {
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.max_receive_message_length": max_message_bytes,
        # a loss call may stay silent for a few seconds on a large batch: keep the connection alive
        "grpc.keepalive_time_ms": 30_000,
        "grpc.keepalive_timeout_ms": 10_000,
        "grpc.http2.max_pings_without_data": 0,
        "grpc.service_config": json.dumps(service_config(round_robin)),
    }
    if round_robin:
        opts["grpc.lb_policy_name"] = "round_robin"
    if extra:
        opts.update(extra)
    return list(opts.items())


def make_channel(
    target: str,
    *,
    tls: bool,
    root_certificates: bytes | str | None,
    client_cert: bytes | str | None,
    client_key: bytes | str | None,
    max_message_bytes: int,
    server_name_override: str | None = None,
    options: dict[str, Any] | None = None,
) -> grpc.Channel:
    if (client_cert is None) != (client_key is None):  # gRPC aborts the process on a half pair
        missing = "client_key" if client_key is None else "client_cert"
        raise ValueError(f"mutual TLS takes client_cert and client_key together: {missing} is missing")
    target, is_name = normalise_target(target)
    extra = dict(options or {})
    if server_name_override:
        extra["grpc.ssl_target_name_override"] = server_name_override
    opts = channel_options(max_message_bytes=max_message_bytes, round_robin=is_name, extra=extra)
    use_tls = tls or root_certificates is not None or client_cert is not None
    if not use_tls:
        return grpc.insecure_channel(target, options=opts)
    creds = grpc.ssl_channel_credentials(
        root_certificates=_read(root_certificates),
        private_key=_read(client_key),
        certificate_chain=_read(client_cert),
    )
    return grpc.secure_channel(target, creds, options=opts)
