"""The client's TLS: which roots `tls=True` trusts, its own certificate material checked at
construction (ValueError naming the argument), and what a refused handshake says."""

from __future__ import annotations

import re
import ssl
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from softgate_client import SoftgateClient, UnavailableError
from softgate_client._channel import os_root_certificates
from test_client_harness import ServerThread

trustme = pytest.importorskip("trustme")


def _server(certs: Any, mutual: bool = False) -> ServerThread:
    creds = grpc.ssl_server_credentials(
        [(certs.server_key_pem, certs.server_cert_pem)],
        root_certificates=certs.ca_pem if mutual else None,
        require_client_auth=mutual,
    )
    return ServerThread(server_credentials=creds)


@pytest.fixture(scope="module")
def tls_port(certs: Any) -> Iterator[int]:
    with _server(certs) as s:
        yield s.port


@pytest.fixture(scope="module")
def mtls_port(certs: Any) -> Iterator[int]:
    with _server(certs, mutual=True) as s:
        yield s.port


def test_tls_without_root_certificates_trusts_the_os_bundle(
    tls_port: int, certs: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by an audit: gRPC trusts its own bundled public roots, not the OS's bundle (a
    private CA installed with update-ca-certificates) nor SSL_CERT_FILE, as the docs said it
    did. (This machine points GRPC_DEFAULT_SSL_ROOTS_FILE_PATH at its bundle: unset here.)"""
    monkeypatch.delenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))
    with SoftgateClient(f"localhost:{tls_port}", tls=True, retries=1, timeout=20) as c:
        assert c.algorithms().limits.max_message_bytes > 0


def test_the_os_bundle_is_looked_for_in_order(
    certs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRPC_DEFAULT_SSL_ROOTS_FILE_PATH: gRPC reads it itself; else SSL_CERT_FILE, Python's
    default cafile, OpenSSL's; none of them: gRPC's bundled roots (None)."""
    monkeypatch.setenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH", str(certs.ca_file))
    assert os_root_certificates() is None
    monkeypatch.delenv("GRPC_DEFAULT_SSL_ROOTS_FILE_PATH")
    monkeypatch.setenv("SSL_CERT_FILE", str(certs.ca_file))
    assert os_root_certificates() == certs.ca_pem
    other = tmp_path / "other.pem"
    other.write_bytes(certs.other_ca_pem)
    missing = str(tmp_path / "missing.pem")
    monkeypatch.setenv("SSL_CERT_FILE", missing)
    paths = ssl.get_default_verify_paths()
    for cafile, openssl_cafile, want in (
        (str(other), missing, certs.other_ca_pem),
        (None, str(other), certs.other_ca_pem),
        (None, missing, None),
    ):
        fake = paths._replace(cafile=cafile, openssl_cafile=openssl_cafile)
        monkeypatch.setattr(ssl, "get_default_verify_paths", lambda fake=fake: fake)
        assert os_root_certificates() == want


def _encrypted(key_pem: bytes, fmt: serialization.PrivateFormat) -> bytes:
    key = serialization.load_pem_private_key(key_pem, password=None)
    return key.private_bytes(
        serialization.Encoding.PEM, fmt, serialization.BestAvailableEncryption(b"secret")
    )


def test_unusable_tls_material_is_refused_at_construction_by_name(certs: Any, tmp_path: Path) -> None:
    """Found by an audit: each went to the server and failed every call, retried, with gRPC's
    `Failed to create security handshaker`, naming nothing."""
    pair = {"client_cert": certs.client_cert_pem, "client_key": certs.client_key_pem}
    cases = [
        (
            {**pair, "client_key": certs.other_client_key_pem},
            "client_key: not the private key of client_cert",
        ),
        (  # a key of another type (OpenSSL 3: NO_CERTIFICATE_ASSIGNED; an audit)
            {
                **pair,
                "client_key": trustme.CA()
                .issue_cert("x", key_type=trustme.KeyType.RSA)
                .private_key_pem.bytes(),
            },
            "client_key: not the private key of client_cert",
        ),
        (
            {**pair, "client_key": _encrypted(certs.client_key_pem, serialization.PrivateFormat.PKCS8)},
            "client_key: encrypted; gRPC needs an unencrypted key",
        ),
        (
            {
                **pair,
                "client_key": _encrypted(
                    certs.client_key_pem, serialization.PrivateFormat.TraditionalOpenSSL
                ),
            },
            "client_key: encrypted; gRPC needs an unencrypted key",
        ),
        (
            {**pair, "client_cert": b"-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n"},
            "client_cert / client_key: not a PEM certificate",
        ),
        (
            {"root_certificates": b"-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n"},
            "root_certificates: not PEM certificates",
        ),
        ({"root_certificates": certs.client_key_pem}, "root_certificates: not PEM certificates"),
        ({"root_certificates": b"\x30\x82\x01\x0a"}, "root_certificates: not PEM certificates"),
        # (an audit: a bare FileNotFoundError / IsADirectoryError, naming no argument)
        (
            {"root_certificates": str(tmp_path / "nope.pem")},
            f"root_certificates: cannot read '{tmp_path / 'nope.pem'}': No such file or directory",
        ),
        (
            {"root_certificates": str(tmp_path)},
            f"root_certificates: cannot read '{tmp_path}': Is a directory",
        ),
        ({**pair, "client_cert": str(tmp_path / "c.pem")}, "client_cert: cannot read "),
        ({**pair, "client_key": str(tmp_path / "c.key")}, "client_key: cannot read "),
    ]
    for kw, why in cases:
        with pytest.raises(ValueError, match=f"^{re.escape(why)}"):
            SoftgateClient("localhost:1", **kw)
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(certs.client_cert_pem)
    key.write_bytes(certs.client_key_pem)
    SoftgateClient(
        "localhost:1", root_certificates=str(certs.ca_file), client_cert=str(cert), client_key=str(key)
    ).close()


@pytest.mark.parametrize(
    "kind, hint",
    [
        ("plaintext", "(the server may speak TLS: pass tls=True / root_certificates)"),
        ("no_client_cert", "(the server may require a client certificate: mutual TLS)"),
        ("untrusted_client_cert", "(the server may not trust client_cert: mutual TLS)"),
    ],
)
def test_a_connection_closed_in_the_handshake_says_what_it_may_mean(
    kind: str, hint: str, tls_port: int, mtls_port: int, certs: Any
) -> None:
    """Found by an audit: each of these read only `UNAVAILABLE: ... Socket closed`."""
    if kind == "plaintext":
        target, kw = f"127.0.0.1:{tls_port}", {}
    else:
        target, kw = f"localhost:{mtls_port}", {"root_certificates": certs.ca_pem}
        if kind == "untrusted_client_cert":
            kw.update(client_cert=certs.other_client_cert_pem, client_key=certs.other_client_key_pem)
    with SoftgateClient(target, retries=1, timeout=20, **kw) as c, pytest.raises(UnavailableError) as ei:
        c.algorithms()
    assert f"Socket closed {hint}" in ei.value.details
    assert ei.value.details.endswith(hint), ei.value.details  # (retries=1: no retry to report)


def test_server_name_override_checks_the_certificate_against_that_name(tmp_path: Path) -> None:
    """A certificate for another name than the target's: refused, unless server_name_override."""
    ca = trustme.CA()
    cert = ca.issue_cert("softgate.internal")
    creds = grpc.ssl_server_credentials(
        [(cert.private_key_pem.bytes(), b"".join(b.bytes() for b in cert.cert_chain_pems))]
    )
    with ServerThread(server_credentials=creds) as s:
        kw = {"root_certificates": ca.cert_pem.bytes(), "retries": 1, "timeout": 20}
        with SoftgateClient(f"127.0.0.1:{s.port}", **kw) as c, pytest.raises(UnavailableError):
            c.algorithms()
        with SoftgateClient(f"127.0.0.1:{s.port}", server_name_override="softgate.internal", **kw) as c:
            assert c.algorithms().limits.max_message_bytes > 0


def test_a_bundle_with_non_ascii_comment_lines_is_taken_as_grpc_takes_it(
    tls_port: int, certs: Any, tmp_path: Path
) -> None:
    """Found by a review: a bundle with a UTF-8 label line (p11-kit's `--comment`, a
    hand-concatenated corporate bundle) was refused as `not PEM certificates`; gRPC uses it."""
    label = '# Label: "NetLock Arany (Class Gold) Főtanúsítvány"\n'.encode()
    bundle = label + certs.other_ca_pem + b"Bag Attributes\n    friendlyName: \xc3\xa9\n" + certs.ca_pem
    path = tmp_path / "bundle.pem"
    path.write_bytes(bundle)
    for roots in (bundle, str(path)):
        with SoftgateClient(f"localhost:{tls_port}", root_certificates=roots, retries=1, timeout=20) as c:
            assert c.algorithms().limits.max_message_bytes > 0
    with pytest.raises(ValueError, match=r"^root_certificates: not PEM certificates \(no -----BEGIN"):
        SoftgateClient("localhost:1", root_certificates=label)


def test_the_key_pair_check_is_skipped_without_a_temporary_folder(
    certs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by a review: OpenSSL loads a key pair from files only, and with no writable
    temporary folder (a read-only root file system) building an mTLS client raised a bare
    FileNotFoundError; the check is skipped there (gRPC still refuses a bad pair)."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "missing"))
    pair = {"client_cert": certs.client_cert_pem, "client_key": certs.other_client_key_pem}
    SoftgateClient("localhost:1", root_certificates=certs.ca_pem, **pair).close()


def test_the_key_pair_check_leaves_no_file_behind(
    certs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The key is written to a private temporary folder for the check: removed after it, the
    check passed, failed, or raised."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    pair = {"client_cert": certs.client_cert_pem, "client_key": certs.client_key_pem}
    SoftgateClient("localhost:1", **pair).close()
    with pytest.raises(ValueError, match=r"^client_key: not the private key of client_cert"):
        SoftgateClient("localhost:1", **{**pair, "client_key": certs.other_client_key_pem})

    def boom(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", boom)
    with pytest.raises(RuntimeError, match="boom"):
        SoftgateClient("localhost:1", **pair)
    assert list(tmp_path.iterdir()) == []
