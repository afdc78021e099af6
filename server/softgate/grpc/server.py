"""Build and run the grpc.aio server: LossService, standard health checking, reflection,
message size, keepalive, max connection age, TLS / mutual TLS, graceful stop.

    server = GrpcServer(settings, engine, telemetry)
    port = await server.start()          # health NOT_SERVING until set_serving(True)
    server.set_serving(True)
    ...
    await server.stop(settings.grace_seconds)
"""

from __future__ import annotations

import asyncio
import datetime
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

from softgate.engine import Engine
from softgate.grpc.codec import Limits, safe_deserializer, serializer
from softgate.grpc.servicer import SERVICE_NAME, LossServicer
from softgate.logging import get_logger
from softgate.settings import (
    CLOCK_SKEW_S,
    SUPPORTED_KEYS,
    Settings,
    cert_early_s,
    cert_not_after,
    host_port,
    tls_problems,
)
from softgate.telemetry import Telemetry
from softgate.threads import on_daemon_thread

log = get_logger("grpc")
# how long a device probe may take (a small sum) before the device reads as hung
PROBE_TIMEOUT_S = 30.0
HEALTH_SERVICES = ("", SERVICE_NAME)
# after a graceful stop, at most this long for the responses of the last calls to reach their
# clients before the server is torn down (bounded by the grace period)
DRAIN_S = 1.0


def channel_options(settings: Settings) -> list[tuple[str, Any]]:
    opts: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", int(settings.keepalive_time_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout_s * 1000)),
        ("grpc.keepalive_permit_without_calls", 1),
        # clients may ping every 10 s, with calls in flight or not (keepalive_permit_without_calls
        # above); the third ping sooner, with no data sent between, closes the connection (GOAWAY
        # ENHANCE_YOUR_CALM "too_many_pings"); the softgate client pings every 30 s
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.so_reuseport", 0),
    ]
    if settings.max_connection_age_s is not None:
        opts += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_s * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.max_connection_age_grace_s * 1000)),
        ]
    return opts


# a set of TLS files refused on reload is checked again after this long though unchanged: a
# renewed certificate further ahead of this host's clock (notBefore) than CLOCK_SKEW_S is
# taken once within it
TLS_RETRY_S = 60.0


class TlsFilesError(OSError):
    """gRPC's TLS refused the certificate and key that the start-up check let through."""


def _iso(t: datetime.datetime | None) -> str | None:
    return None if t is None else t.strftime("%Y-%m-%dT%H:%M:%SZ")


class TlsFiles:
    """The server's certificate, key and client CA, re-read when one of the files changes:
    gRPC asks `fetch` before every TLS handshake (grpc.dynamic_ssl_server_credentials), so a
    rotated Secret is served from the next new connection on, without a restart."""

    config: grpc.ServerCertificateConfiguration
    not_after: datetime.datetime | None

    def __init__(self, cert: str, key: str, client_ca: str | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._refused: Any = None  # the stamp of a set refused on reload, and when
        self._refused_at = 0.0
        self._use(self._read())

    @property
    def not_after_timestamp(self) -> float | None:
        """When the certificate served now expires (its notAfter), in Unix seconds; None when
        it does not parse (gRPC then refused it at start)."""
        return None if self.not_after is None else self.not_after.timestamp()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.config, self.fetch, require_client_authentication=self.client_ca is not None
        )

    def _paths(self) -> tuple[str, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        """Each file's (inode, mtime, size), symlinks followed: a Kubernetes Secret volume swaps
        its files by re-pointing the ..data symlink, so the inode changes."""
        return tuple((s.st_ino, s.st_mtime_ns, s.st_size) for s in map(os.stat, self._paths()))

    def _read(self) -> tuple[grpc.ServerCertificateConfiguration, datetime.datetime | None, float]:
        """The configuration, the certificate's notAfter, and how far it is ahead of this clock."""
        cert, key = Path(self.cert).read_bytes(), Path(self.key).read_bytes()
        ca = Path(self.client_ca).read_bytes() if self.client_ca else None
        config = grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)
        pem = cert.decode(errors="replace")
        return config, cert_not_after(pem), cert_early_s(pem)

    def _use(self, new: tuple[grpc.ServerCertificateConfiguration, datetime.datetime | None, float]) -> None:
        """Serve `new` (from `_read`), with a warning when its certificate is not valid yet."""
        self.config, self.not_after, early = new
        if early:  # (tls_problems refused it past CLOCK_SKEW_S)
            log.warning(
                "tls_not_yet_valid",
                cert=self.cert,
                seconds=round(early, 1),
                action=f"serving it: within the {CLOCK_SKEW_S:g} s of clock skew allowed",
            )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed and pass the start-up checks, else None
        (gRPC keeps the current one). A refused set is logged once, and checked again after
        TLS_RETRY_S."""
        with self._lock:
            try:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                refused = stamp == self._refused
                if refused and time.monotonic() - self._refused_at < TLS_RETRY_S:
                    return None
                problems = tls_problems(self.cert, self.key, self.client_ca)
                new = None if problems else self._read()
                if self._stat() != stamp:
                    return None  # changed while read: the next handshake reads it again
            except OSError:  # a swap half done, a file gone: keep serving what we have
                return None
            if new is None:
                if not refused:
                    log.warning(
                        "tls_reload_failed",
                        error="; ".join(problems),
                        action="serving the previous certificate",
                    )
                self._refused, self._refused_at = stamp, time.monotonic()
                return None
            self._stamp, self._refused = stamp, None
            self._use(new)
            log.info("tls_reloaded", not_after=_iso(self.not_after), cert=self.cert)
            return self.config


def loss_service_handler(servicer: LossServicer) -> grpc.GenericRpcHandler:
    """Like the generated `add_LossServiceServicer_to_server`, but a request that is not valid
    protobuf reaches the servicer as a `CorruptMessage` (-> INVALID_ARGUMENT with BadRequest)
    instead of failing inside grpcio (UNKNOWN / INTERNAL), and the loss RPCs get their requests
    as `codec.Received` (wire size, zero-copy tensor views) and may answer `codec.Encoded` bytes."""
    de = safe_deserializer
    handlers = {
        # the unary calls that carry a batch are read as a stream of one: the handler admits the
        # call before its request is read, so a call refused at max_concurrent_rpcs never holds
        # its (up to 512 MB) request in memory
        "ComputeAdvantages": grpc.stream_unary_rpc_method_handler(
            servicer.ComputeAdvantages,
            request_deserializer=de(pb.ComputeAdvantagesRequest),
            response_serializer=pb.ComputeAdvantagesResponse.SerializeToString,
        ),
        "ComputeLoss": grpc.stream_unary_rpc_method_handler(
            servicer.ComputeLoss,
            request_deserializer=de(pb.ComputeLossRequest, batch_field=2),
            response_serializer=serializer(pb.ComputeLossResponse),
        ),
        "StreamLoss": grpc.stream_stream_rpc_method_handler(
            servicer.StreamLoss,
            request_deserializer=de(pb.StreamLossRequest, batch_field=3),
            response_serializer=serializer(pb.StreamLossResponse),
        ),
        "ListAlgorithms": grpc.stream_unary_rpc_method_handler(
            servicer.ListAlgorithms,
            request_deserializer=de(pb.ListAlgorithmsRequest),
            response_serializer=pb.ListAlgorithmsResponse.SerializeToString,
        ),
    }
    assert set(handlers) == set(pb.DESCRIPTOR.services_by_name["LossService"].methods_by_name)
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


def bind_error(host: str, port: int) -> str | None:
    """Why the OS refuses a listening socket on host:port ("Address already in use"), or None
    when a plain socket binds it: gRPC's own error only points at GRPC_VERBOSITY."""
    try:
        family, *_, addr = socket.getaddrinfo(
            host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        socket.create_server(addr[:2], family=family).close()
    except OSError as e:
        if isinstance(e, socket.gaierror) or not e.errno:
            return e.strerror or str(e)
        return os.strerror(e.errno)  # (create_server's own strerror repeats the address)
    return None


class GrpcServer:
    """The gRPC side of `softgate serve` (usable on its own in tests)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        telemetry: Telemetry | None = None,
        *,
        servicer: LossServicer | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.telemetry = telemetry if telemetry is not None else Telemetry()
        self.executor = ThreadPoolExecutor(settings.engine_workers, thread_name_prefix="softgate-engine")
        self.servicer = servicer or LossServicer(
            engine,
            self.executor,
            self.telemetry,
            max_concurrent_rpcs=settings.max_concurrent_rpcs,
            limits=Limits(
                settings.max_tokens, settings.max_sequences, settings.max_groups, settings.max_stream_chunks
            ),
            max_message_bytes=settings.max_message_bytes,
            stream_idle_timeout_s=settings.stream_idle_timeout_s,
            inline_max_tokens=settings.inline_max_tokens,
            log_requests=settings.log_requests,
        )
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.port: int | None = None
        self.serving = False
        self.tls: TlsFiles | None = None  # (set by start, with TLS on)
        # a device that failed its probe after a call's CUDA error: why (serve then exits 1)
        self.device_failed: str | None = None
        self.on_device_failed: Callable[[], None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self.servicer.on_device_error = self._device_error

    def _device_error(self, exc: BaseException) -> None:
        """A call's CUDA error other than out of memory: probe the device, one probe at a time."""
        if self.device_failed is None and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._check_device(exc))

    async def _check_device(self, exc: BaseException) -> None:
        """A device that fails a probe after a CUDA error has lost its context for good (an
        illegal address, an uncorrectable ECC error): every later call would fail INTERNAL while
        the health stayed SERVING, and no probe restarted the replica (an audit). A probe that
        does not end in PROBE_TIMEOUT_S (a wedged device) fails too. Then `on_device_failed`
        is told (serve stops, exit 1, for a restart) and health turns NOT_SERVING."""
        try:
            probe = on_daemon_thread(self.engine.device_problem, "softgate-device-probe")
            problem = await asyncio.wait_for(probe, PROBE_TIMEOUT_S)  # (a hung one is left behind)
        except asyncio.TimeoutError:
            problem = f"the probe did not end in {PROBE_TIMEOUT_S:g} s: a hung device"
        error = f"{type(exc).__name__}: {exc}"
        if problem is None:
            log.warning("device_error", error=error, action="the device passed a probe: serving on")
            return
        self.device_failed = problem
        log.error("device_failed", error=error, probe=problem, action="not serving: exiting for a restart")
        if self.on_device_failed is not None:  # (first: a warm-up ending now must not turn SERVING)
            self.on_device_failed()
        await self.set_serving(False)

    @property
    def tls_not_after(self) -> float | None:
        """When the certificate served now expires (notAfter), Unix seconds; None without TLS.
        Follows rotations."""
        return self.tls.not_after_timestamp if self.tls is not None else None

    @property
    def address(self) -> str:
        return host_port(self.settings.grpc_host, self.port)

    async def start(self) -> int:
        """Bind and start; health is NOT_SERVING until `set_serving(True)`. Returns the port."""
        s = self.settings
        server = grpc.aio.server(options=channel_options(s))
        server.add_generic_rpc_handlers((loss_service_handler(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        names = (
            pb.DESCRIPTOR.services_by_name["LossService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        bind = host_port(s.grpc_host, s.grpc_port)
        if s.tls_cert is not None and s.tls_key is not None:
            self.tls = TlsFiles(s.tls_cert, s.tls_key, s.tls_client_ca)
        failure = "address in use?"
        try:
            if self.tls is not None:
                port = server.add_secure_port(bind, self.tls.credentials())
            else:
                port = server.add_insecure_port(bind)
        except RuntimeError as e:
            port, failure = 0, str(e)
        if not port:
            in_use = bind_error(s.grpc_host, s.grpc_port)
            if self.tls is not None and in_use is None:  # (the address is free: the files are the cause)
                raise TlsFilesError(
                    f"tls_cert / tls_key: gRPC's TLS cannot use {s.tls_cert!r} and {s.tls_key!r} "
                    f"({SUPPORTED_KEYS})"
                )
            raise OSError(f"cannot bind gRPC on {bind}: {in_use or failure}")
        await self._set_all(health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        self.server, self.port = server, port
        tls_fields: dict[str, Any] = {} if self.tls is None else {"not_after": _iso(self.tls.not_after)}
        log.info(
            "grpc_listening",
            address=self.address,
            port=port,
            tls=s.tls,
            mutual_tls=s.tls_client_ca is not None,
            **tls_fields,
            max_message_bytes=s.max_message_bytes,
            max_concurrent_rpcs=s.max_concurrent_rpcs,
        )
        return port

    async def _set_all(self, status: Any) -> None:
        for name in HEALTH_SERVICES:
            await self.health.set(name, status)

    async def set_serving(self, serving: bool) -> None:
        serving = serving and self.device_failed is None
        self.serving = serving
        await self._set_all(
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new RPCs, let in-flight ones finish within `grace`."""
        if self.server is None:
            return
        self.serving = False
        await self.health.enter_graceful_shutdown()
        self.servicer.closing = True  # from here new loss calls are refused with UNAVAILABLE
        log.info("grpc_stopping", in_flight=self.servicer.in_flight, grace_seconds=grace)
        left: float | None = None
        if grace is not None:
            end = time.monotonic() + grace
            # the calls in flight finish (and their responses get on their way) before gRPC's own
            # shutdown: it reset the connection of a call whose handler was still running (a
            # client then saw UNAVAILABLE for a call the server had accepted)
            while self.servicer.in_flight > 0 and time.monotonic() < end:
                await asyncio.sleep(0.01)
            # the last responses may still be on their way; a torn-down server resets their
            # connections and a client that had not read its whole response sees UNAVAILABLE
            since = time.monotonic() - self.servicer.last_finished
            wait = min(DRAIN_S - since, end - time.monotonic())
            if wait > 0:
                await asyncio.sleep(wait)
            left = max(end - time.monotonic(), 0.0)
            if self.servicer.in_flight == 0:  # what is left never ends by itself: a health Watch
                left = min(left, DRAIN_S)  # stream held every stop for the whole grace (an audit)
        self.servicer.stopping = True  # what is still running now is cut: its client reads UNAVAILABLE
        await self.server.stop(left)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.server = None
        log.info("grpc_stopped")

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()
