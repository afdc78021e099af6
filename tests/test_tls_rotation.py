"""TLS files rotated under a running server (grpc.dynamic_ssl_server_credentials): a new
connection gets the new certificate, a bad new set keeps the old one (logged once), Kubernetes'
symlinked `..data` swap works; and start-up refuses an expired certificate, logs notAfter, and
names the TLS files when gRPC cannot use them."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from conftest import log_records, self_signed
from softgate import serve
from softgate import settings as settings_module
from softgate.engine import Engine
from softgate.grpc import server as grpc_server
from softgate.grpc.server import GrpcServer, TlsFilesError
from softgate.settings import Settings
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb
from softgate_client.proto.softgate.v1 import softgate_pb2_grpc as pb_grpc

trustme = pytest.importorskip("trustme")
x509 = pytest.importorskip("cryptography.x509")


@pytest.fixture(scope="module")
def ca() -> Any:
    return trustme.CA()


def _pair(ca: Any, *, days: tuple[float, float] | None = None) -> tuple[bytes, bytes]:
    """(certificate chain PEM, key PEM) for localhost / 127.0.0.1 from `ca`; `days`: its
    validity from now, in days (trustme's own otherwise)."""
    if days is None:
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        return b"".join(b.bytes() for b in leaf.cert_chain_pems), leaf.private_key_pem.bytes()
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + datetime.timedelta(days=days[0]))
        .not_valid_after(now + datetime.timedelta(days=days[1]))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


class SecretVolume:
    """A directory laid out as a Kubernetes Secret volume: tls.crt -> ..data/tls.crt, ..data ->
    ..<version>/; `update` writes a new version and swaps ..data atomically, as the kubelet does."""

    def __init__(self, root: Path, files: dict[str, bytes]) -> None:
        self.root, self.version = root, 0
        self.update(files)
        for name in files:
            (root / name).symlink_to(Path("..data") / name)

    def update(self, files: dict[str, bytes]) -> None:
        self.version += 1
        d = self.root / f"..v{self.version}"
        d.mkdir()
        for name, data in files.items():
            (d / name).write_bytes(data)
        (self.root / "..data_tmp").symlink_to(d.name)
        os.replace(self.root / "..data_tmp", self.root / "..data")

    def path(self, name: str) -> str:
        return str(self.root / name)


def _served(port: int, ca: Any, client: Any = None, *, verify: bool = True) -> bytes:
    """The DER of the certificate a new TLS connection to 127.0.0.1:port is given (presenting
    `client`'s certificate, a trustme LeafCert, when given; not checking it unless `verify`)."""
    ctx = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    if not verify:  # (a certificate not yet valid on this clock)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if client is not None:
        with client.cert_chain_pems[0].tempfile() as cert, client.private_key_pem.tempfile() as key:
            ctx.load_cert_chain(cert, key)
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _der(chain: bytes) -> bytes:
    return ssl.PEM_cert_to_DER_cert(
        chain.decode().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    )


def _not_after(chain: bytes) -> datetime.datetime:
    return x509.load_pem_x509_certificate(chain).not_valid_after_utc


def _run(settings: Settings, body: Callable[[GrpcServer], Awaitable[None]]) -> None:
    """`body(server)` with a started GrpcServer of `settings` (loopback, port 0)."""

    async def main() -> None:
        server = GrpcServer(settings, Engine(device="cpu"))
        await server.start()
        try:
            await body(server)
        finally:
            await server.stop(0)

    asyncio.run(main())


def _settings(vol: SecretVolume, **more: Any) -> Settings:
    return Settings(
        grpc_host="127.0.0.1",
        grpc_port=0,
        admin_port=None,
        tls_cert=vol.path("tls.crt"),
        tls_key=vol.path("tls.key"),
        **more,
    )


def test_a_rotated_certificate_is_served_to_new_connections(tmp_path: Path, ca: Any) -> None:
    """The files were read once at start: a renewed Secret changed nothing until a restart, and
    the old certificate's expiry took the whole service down (an audit)."""
    (c1, k1), (c2, k2), (c3, k3) = _pair(ca), _pair(ca), _pair(ca)
    vol = SecretVolume(tmp_path, {"tls.crt": c1, "tls.key": k1})

    async def body(server: GrpcServer) -> None:
        assert server.port is not None
        assert await asyncio.to_thread(_served, server.port, ca) == _der(c1)
        assert server.tls_not_after == _not_after(c1).timestamp()
        vol.update({"tls.crt": c2, "tls.key": k2})  # the kubelet's swap
        assert await asyncio.to_thread(_served, server.port, ca) == _der(c2)
        assert server.tls_not_after == _not_after(c2).timestamp()
        Path(vol.path("tls.key")).write_bytes(k3)  # rewritten in place, key first
        Path(vol.path("tls.crt")).write_bytes(c3)
        assert await asyncio.to_thread(_served, server.port, ca) == _der(c3)

    with log_records("softgate.grpc") as logs:
        _run(_settings(vol), body)
    [listening] = logs.fields("grpc_listening")
    assert listening["not_after"] == _not_after(c1).isoformat().replace("+00:00", "Z")
    reloaded = [f["not_after"] for f in logs.fields("tls_reloaded")]
    assert reloaded[0] == _not_after(c2).isoformat().replace("+00:00", "Z")
    assert reloaded[-1] == _not_after(c3).isoformat().replace("+00:00", "Z")
    assert logs.fields("tls_reload_failed") == []


@pytest.mark.parametrize("bad", ["mismatched key", "expired", "missing file"])
def test_a_bad_rotation_keeps_the_old_certificate_and_logs_once(tmp_path: Path, ca: Any, bad: str) -> None:
    (c1, k1), (c2, k2) = _pair(ca), _pair(ca)
    vol = SecretVolume(tmp_path, {"tls.crt": c1, "tls.key": k1})

    async def body(server: GrpcServer) -> None:
        assert server.port is not None
        if bad == "mismatched key":
            vol.update({"tls.crt": c2, "tls.key": k1})
        elif bad == "expired":
            ce, ke = _pair(ca, days=(-10, -1))
            vol.update({"tls.crt": ce, "tls.key": ke})
        else:  # a swap half done, or a file removed: the current set stays, without a word
            vol.update({"tls.crt": c2})
        for _ in range(4):
            assert await asyncio.to_thread(_served, server.port, ca) == _der(c1)
        assert server.tls_not_after == _not_after(c1).timestamp()
        vol.update({"tls.crt": c2, "tls.key": k2})  # then a good set
        assert await asyncio.to_thread(_served, server.port, ca) == _der(c2)

    with log_records("softgate.grpc") as logs:
        _run(_settings(vol), body)
    failed = logs.fields("tls_reload_failed")
    if bad == "missing file":
        assert failed == []
    else:
        [fields] = failed
        assert ("tls_key:" if bad == "mismatched key" else "expired on") in fields["error"]
    assert len(logs.fields("tls_reloaded")) == 1


def test_a_certificate_not_yet_valid_is_taken_once_it_is(
    tmp_path: Path, ca: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewed certificate further ahead of this host's clock than CLOCK_SKEW_S is refused,
    then taken once within it (with the start-up's warning), though its files do not change
    again. (The server's clock is set back past the skew allowed, then to a minute behind, so
    that no margin of a loaded machine's seconds is raced: the client's is real.)"""
    monkeypatch.setattr(grpc_server, "TLS_RETRY_S", 0.2)

    class Clock(datetime.datetime):
        behind = datetime.timedelta(seconds=settings_module.CLOCK_SKEW_S + 60)

        @classmethod
        def now(cls, tz: datetime.tzinfo | None = None) -> Any:
            return datetime.datetime.now(tz) - cls.behind

    monkeypatch.setattr(
        settings_module, "datetime", SimpleNamespace(datetime=Clock, timezone=datetime.timezone)
    )
    (c1, k1) = _pair(ca)
    c2, k2 = _pair(ca, days=(-30 / 86400, 10))  # valid 30 s ago: in a minute on the server's clock
    vol = SecretVolume(tmp_path, {"tls.crt": c1, "tls.key": k1})

    async def body(server: GrpcServer) -> None:
        assert server.port is not None
        vol.update({"tls.crt": c2, "tls.key": k2})
        assert await asyncio.to_thread(_served, server.port, ca) == _der(c1)
        assert await asyncio.to_thread(_served, server.port, ca) == _der(c1)
        Clock.behind = datetime.timedelta(minutes=1)  # 30 s ahead of it now: within the skew
        end = time.monotonic() + 30
        while await asyncio.to_thread(_served, server.port, ca) != _der(c2):
            assert time.monotonic() < end, "the certificate was never taken"
            await asyncio.sleep(0.1)

    with log_records("softgate.grpc") as logs:
        _run(_settings(vol), body)
    [failed] = logs.fields("tls_reload_failed")
    assert "is not valid before" in failed["error"]
    assert len(logs.fields("tls_reloaded")) == 1
    [early] = logs.fields("tls_not_yet_valid")
    assert early["cert"] == vol.path("tls.crt") and 0 < early["seconds"] <= 30


def test_a_certificate_a_little_ahead_of_this_clock_is_served_with_a_warning(tmp_path: Path, ca: Any) -> None:
    """Some issuers set notBefore to the issue time: a pod on a node whose clock was a second
    behind exited 2, a bad setting that supervisors do not retry (a review)."""
    cert, key = _pair(ca, days=(120 / 86400, 10))  # valid in 2 minutes
    vol = SecretVolume(tmp_path, {"tls.crt": cert, "tls.key": key})

    async def body(server: GrpcServer) -> None:
        assert server.port is not None
        assert await asyncio.to_thread(_served, server.port, ca, verify=False) == _der(cert)

    with log_records("softgate.grpc") as logs:
        _run(_settings(vol), body)
    [early] = logs.fields("tls_not_yet_valid")
    assert early["cert"] == vol.path("tls.crt") and 0 < early["seconds"] <= 120, early
    assert [r.levelname for r in logs.records if r.getMessage() == "tls_not_yet_valid"] == ["WARNING"]


def test_mutual_tls_stays_required_after_a_rotation(tmp_path: Path, ca: Any) -> None:
    (c1, k1), (c2, k2) = _pair(ca), _pair(ca)
    client = ca.issue_cert("client@example.com")
    vol = SecretVolume(tmp_path, {"tls.crt": c1, "tls.key": k1, "ca.crt": ca.cert_pem.bytes()})

    def call(port: int, with_cert: bool) -> str:
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.cert_pem.bytes(),
            private_key=client.private_key_pem.bytes() if with_cert else None,
            certificate_chain=client.cert_chain_pems[0].bytes() if with_cert else None,
        )
        opts = [("grpc.ssl_target_name_override", "localhost"), ("grpc.use_local_subchannel_pool", 1)]
        with grpc.secure_channel(f"127.0.0.1:{port}", creds, options=opts) as ch:
            try:
                pb_grpc.LossServiceStub(ch).ListAlgorithms(pb.ListAlgorithmsRequest(), timeout=5)
            except grpc.RpcError as e:
                return str(e.code().name)
        return "OK"

    async def body(server: GrpcServer) -> None:
        assert server.port is not None
        vol.update({"tls.crt": c2, "tls.key": k2, "ca.crt": ca.cert_pem.bytes()})
        assert await asyncio.to_thread(call, server.port, True) == "OK"
        assert await asyncio.to_thread(_served, server.port, ca, client) == _der(c2)
        assert await asyncio.to_thread(call, server.port, False) == "UNAVAILABLE"

    _run(_settings(vol, tls_client_ca=vol.path("ca.crt")), body)


def test_a_pair_grpc_refuses_names_the_tls_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A key the start-up check let through (then: DSA, RSA-PSS, secp256k1) failed the bind with
    "cannot bind gRPC on 127.0.0.1:0: Failed to bind ..." (an audit)."""
    from cryptography.hazmat.primitives.asymmetric import dsa

    files = self_signed(tmp_path, dsa.generate_private_key(2048))
    s = Settings(grpc_host="127.0.0.1", grpc_port=0, admin_port=None, **files)
    with pytest.raises(TlsFilesError) as e:
        _run(s, lambda server: asyncio.sleep(0))
    assert str(e.value).startswith("tls_cert / tls_key: gRPC's TLS cannot use ")
    assert "cannot bind" not in str(e.value) and "RSA" in str(e.value)
    # and `softgate serve` exits 2, as for the settings the start-up check refuses (was 1)
    monkeypatch.setattr(serve, "fit_threads_to_cpu_quota", lambda: None)
    with log_records("softgate.serve") as logs:
        assert serve._run(s.replace(warmup=False, device="cpu"), None) == 2
    [failed] = logs.fields("startup_failed")
    assert failed["error"] == str(e.value)


def test_serve_refuses_an_expired_certificate(
    tmp_path: Path, ca: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    from softgate.cli import main

    cert, key = _pair(ca, days=(-10, -1))
    (tmp_path / "c.pem").write_bytes(cert)
    (tmp_path / "k.pem").write_bytes(key)
    args = ["serve", "--grpc-port", "0", "--admin-port", "-1", "--no-warmup", "--device", "cpu"]
    assert main([*args, "--tls-cert", str(tmp_path / "c.pem"), "--tls-key", str(tmp_path / "k.pem")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("softgate serve: tls_cert: ") and "expired on" in err, err


def test_unchanged_files_log_nothing(tmp_path: Path, ca: Any) -> None:
    """gRPC asks for the files before every handshake: an unchanged set costs three stat calls
    and logs nothing, even at DEBUG."""
    (c1, k1) = _pair(ca)
    vol = SecretVolume(tmp_path, {"tls.crt": c1, "tls.key": k1})

    async def body(server: GrpcServer) -> None:
        assert server.port is not None
        for _ in range(3):
            assert await asyncio.to_thread(_served, server.port, ca) == _der(c1)

    with log_records("softgate.grpc", logging.DEBUG) as logs:
        _run(_settings(vol), body)
    assert [r.getMessage() for r in logs.records if r.getMessage().startswith("tls_")] == []
