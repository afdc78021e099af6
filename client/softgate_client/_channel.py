"""Channel construction: message limits, round-robin over every address a DNS name resolves
to (a headless Kubernetes service), TLS / mTLS (the caller's PEM checked first), keepalive."""

from __future__ import annotations

import json
import math
import os
import re
import ssl
import tempfile
from dataclasses import dataclass
from typing import Any

import grpc

DEFAULT_PORT = 50051
DEFAULT_MAX_MESSAGE_BYTES = 512 * 1024 * 1024  # the server default
# the details of a call a server's gRPC core cancelled as the server shut down (the call was
# never handled; any other CANCELLED, e.g. "Locally cancelled by application!", is not retried)
SHUTDOWN_CANCELLED = "CANCELLED"


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE, RESOURCE_EXHAUSTED and a server's shutdown CANCELLED (see
    `retryable`) with capped exponential backoff and full jitter: retry k (k >= 1) waits
    uniform(0, min(max_backoff, initial_backoff * multiplier**(k-1))).
    A call is retried until `budget` seconds after it started or its own deadline, whichever
    comes first (a restarting server takes seconds to come back), and at most `max_attempts`
    attempts in all when that is set (None: the budget alone decides); a RESOURCE_EXHAUSTED
    other than a busy server's at most `exhausted_attempts`. A loss call is a pure function of
    its request, so retrying it is always safe."""

    max_attempts: int | None = None
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    # RESOURCE_EXHAUSTED: a server at its concurrency limit (or out of device memory) says so at
    # once; a message over a size limit is never retried (see `retryable`)
    # CANCELLED: only the one a server's gRPC core sends as it shuts down (see `retryable`)
    retry_on: tuple[grpc.StatusCode, ...] = (
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    )
    budget: float = 60.0
    # a RESOURCE_EXHAUSTED other than a busy server's (out of memory: far more often a batch
    # too large for the device than a transient) gets one retry, not a minute of them
    exhausted_attempts: int = 2

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"max_attempts: {self.max_attempts} must be at least 1, or None")
        if not self.budget >= 0:  # (NaN too)
            raise ValueError(f"budget: {self.budget} must be a number of seconds >= 0")
        # checked here, not at the first retry (a NaN or negative wait failed only there)
        for name, least in (("initial_backoff", 0.0), ("max_backoff", 0.0), ("multiplier", 1.0)):
            value = getattr(self, name)
            try:
                ok = math.isfinite(value) and value >= least
            except TypeError:
                ok = False
            if not ok:
                raise ValueError(f"{name}: {value!r} must be a finite number >= {least:g}")

    def retryable(self, code: grpc.StatusCode | None, details: str | None) -> bool:
        if code not in self.retry_on:
            return False
        d = details or ""
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in d:
            return False
        # a server's gRPC core cancels the calls that arrive in the instant it shuts down (its
        # details: "CANCELLED"); a call this process cancelled says so in other words
        if code == grpc.StatusCode.CANCELLED and d != SHUTDOWN_CANCELLED:
            return False
        # this client's own TLS material could not be used: no attempt will differ
        return "Failed to create security handshaker" not in d

    def attempts(self, code: grpc.StatusCode | None, details: str | None, reason: str | None = None) -> float:
        """The most attempts in all for a call failing with `code` (math.inf: no cap); `reason`
        the status's ErrorInfo reason (SERVER_BUSY: a busy server; a server without ErrorInfo
        says "server busy" in its message)."""
        cap = math.inf if self.max_attempts is None else self.max_attempts
        busy = reason == "SERVER_BUSY" or (reason is None and "server busy" in (details or ""))
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED and not busy:
            return min(cap, self.exhausted_attempts)
        return cap

    def backoff(self, attempt: int) -> float:
        """The upper bound of the wait before retry number `attempt` (1-based)."""
        return float(min(self.max_backoff, self.initial_backoff * self.multiplier ** min(attempt - 1, 64)))


def _read(x: bytes | str | os.PathLike[str] | None, name: str) -> bytes | None:
    """Certificate material given as bytes (PEM) or as a path to a PEM file; a file that
    cannot be read is a ValueError naming the argument `name`, as unusable material is."""
    if x is None or isinstance(x, bytes):
        return x
    s = os.fspath(x)
    if "-----BEGIN" in s:
        return s.encode()
    try:
        with open(s, "rb") as f:
            return f.read()
    except OSError as e:  # (a missing file, a folder, no permission)
        raise ValueError(f"{name}: cannot read {s!r}: {e.strerror or e}") from None


def _with_port(hostport: str) -> str:
    """`host`, `[v6]` or a bare v6 literal (`::1`) without a port gets the default port."""
    if hostport.startswith("["):
        return hostport if "]:" in hostport else f"{hostport}:{DEFAULT_PORT}"
    if hostport.count(":") >= 2:  # an IPv6 literal (a port is only ever given after `[v6]`)
        return f"[{hostport}]:{DEFAULT_PORT}"
    return hostport if ":" in hostport else f"{hostport}:{DEFAULT_PORT}"


def normalise_target(target: str) -> tuple[str, bool]:
    """(target, is_dns_name): a `host`, `dns:///host` or `ipv4:` / `ipv6:` address without a
    port gets the default port (gRPC's DNS resolver would pick 443; `ipv4:127.0.0.1` is not a
    valid target to gRPC); `dns:` targets and host names (not IP literals, not `unix:`) are
    names whose addresses round-robin spreads calls over."""
    t = target.strip()
    if t.startswith(("unix:", "unix-abstract:")):
        return t, False
    if t.startswith(("ipv4:", "ipv6:")):  # ipv4:a[:port][,b[:port]...], or after an empty authority `///`
        scheme, rest = t[:5], t[5:]
        slashes = "///" if rest.startswith("///") else ""
        addresses = rest[len(slashes) :].split(",")
        return scheme + slashes + ",".join(_with_port(a) for a in addresses), False
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
        # reconnect at least every 5 s: gRPC's own backoff (1 s x1.6 up to 120 s) left a server
        # back after 45 s untried until the 60 s retry budget ran out, every retry failing at
        # once on the channel's cached "Connection refused" (an audit). (Not
        # min_reconnect_backoff_ms: that is the shortest connect timeout.)
        "grpc.initial_reconnect_backoff_ms": 100,
        "grpc.max_reconnect_backoff_ms": 5_000,
        "grpc.service_config": json.dumps(service_config(round_robin)),
    }
    if round_robin:
        opts["grpc.lb_policy_name"] = "round_robin"
    if extra:
        opts.update(extra)
    return list(opts.items())


def uses_tls(tls: bool, root_certificates: object, client_cert: object) -> bool:
    """Whether a channel with these arguments speaks TLS (root certificates or a client
    certificate alone turn it on)."""
    return tls or root_certificates is not None or client_cert is not None


def os_root_certificates() -> bytes | None:
    """The CA bundle `tls=True` trusts without `root_certificates`: none of ours when gRPC is
    pointed at a file (GRPC_DEFAULT_SSL_ROOTS_FILE_PATH); else the first file that exists of
    SSL_CERT_FILE, Python's default cafile and OpenSSL's; None (gRPC's bundled public roots,
    which know no private CA) when there is none."""
    if os.environ.get("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH"):
        return None
    paths = ssl.get_default_verify_paths()
    for f in (os.environ.get("SSL_CERT_FILE"), paths.cafile, paths.openssl_cafile):
        if f and os.path.isfile(f):
            with open(f, "rb") as fh:
                return fh.read()
    return None


_ENCRYPTED_KEY = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")


def _tls_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    # only whether the PEM parses and matches: this host's OpenSSL security level (a key size,
    # a digest) is not gRPC's, which does its own checks in the handshake
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    return ctx


_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----", re.S)


def _key_pair_problem(cert: bytes, key: bytes) -> str | None:
    """Why OpenSSL refuses `cert` + `key` as a pair, or None: also when it cannot be asked
    (it loads a pair from files only, written to a private temporary folder removed after:
    none is writable on a read-only file system, and gRPC still refuses a bad pair itself)."""
    try:
        folder = tempfile.TemporaryDirectory(prefix="softgate-tls-")  # (mode 0700)
    except OSError:
        return None
    with folder as d:
        paths = [os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")]
        try:
            for path, blob in zip(paths, (cert, key), strict=True):
                with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                    f.write(blob)
        except OSError:  # (a full disk)
            return None
        try:  # (a password callback: an encrypted key the caller's check missed never prompts)
            _tls_context().load_cert_chain(paths[0], paths[1], password=lambda: b"")
        except ssl.SSLError as e:
            return str(e)
    return None


def check_tls_material(roots: bytes | None, cert: bytes | None, key: bytes | None) -> None:
    """Refuse, naming the argument, TLS material gRPC cannot use: it would fail every call
    with an opaque `Failed to create security handshaker`."""
    if roots is not None:
        # the certificate blocks only, as gRPC reads them: a bundle's label and comment lines
        # around them may be in any encoding (`# Label: "... Főtanúsítvány"`)
        blocks = b"\n".join(_PEM_CERTIFICATE.findall(roots))
        try:
            if not blocks:
                raise ValueError("no -----BEGIN CERTIFICATE----- block")
            _tls_context().load_verify_locations(cadata=blocks.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"root_certificates: not PEM certificates ({e})") from None
    if cert is None or key is None:
        return
    if any(mark in key for mark in _ENCRYPTED_KEY):
        raise ValueError(
            "client_key: encrypted; gRPC needs an unencrypted key (openssl pkey -in KEY -out KEY.plain)"
        )
    problem = _key_pair_problem(cert, key)
    if problem is None:
        return
    if "KEY_VALUES_MISMATCH" in problem or "NO_CERTIFICATE_ASSIGNED" in problem:  # (a key of another type)
        raise ValueError("client_key: not the private key of client_cert")
    raise ValueError(
        f"client_cert / client_key: not a PEM certificate and its unencrypted private key ({problem})"
    )


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
    if not uses_tls(tls, root_certificates, client_cert):
        return grpc.insecure_channel(target, options=opts)
    roots = _read(root_certificates, "root_certificates")
    cert, key = _read(client_cert, "client_cert"), _read(client_key, "client_key")
    check_tls_material(roots, cert, key)
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots if roots is not None else os_root_certificates(),
        private_key=key,
        certificate_chain=cert,
    )
    return grpc.secure_channel(target, creds, options=opts)
