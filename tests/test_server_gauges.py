"""The gRPC server's own state on /metrics: the max_concurrent_rpcs slots taken (a call holds
one from admission, before it has sent anything) and the served TLS certificate's expiry."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import ServerProcess
from prometheus_client.parser import text_string_to_metric_families


def _samples(url: str) -> dict[str, float]:
    """name{labels} -> value of every softgate_ sample on /metrics."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def _until(url: str, name: str, value: float, timeout: float = 10.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        got = _samples(url)
        if got.get(name) == value or time.monotonic() > deadline:
            assert got.get(name) == value, (name, got.get(name))
            return got
        time.sleep(0.05)


def test_slots_held_by_calls_that_send_nothing_show(serve_process: Any) -> None:
    """While silent calls held every slot, the in-flight gauges read 0 and only the busy
    refusals rose, so the busy alert's "add replicas" looked right (an audit)."""
    srv = serve_process(max_concurrent_rpcs=4)
    before = _samples(srv.admin_url)
    assert before["softgate_admitted_rpcs"] == 0 and before["softgate_max_concurrent_rpcs"] == 4
    assert "softgate_tls_cert_not_after_seconds" not in before  # (no TLS)
    assert [n for n in before if "_created" in n] == []  # (~140 series nothing reads; an audit)
    release = threading.Event()

    def silent() -> Any:
        release.wait(30)
        return
        yield  # (a generator that sends nothing)

    with srv.channel() as ch:
        call = ch.stream_stream("/softgate.v1.LossService/StreamLoss")(silent())
        try:
            got = _until(srv.admin_url, "softgate_admitted_rpcs", 1)
            assert got["softgate_in_flight_requests{rpc=StreamLoss}"] == 0  # (no work started)
        finally:
            call.cancel()
            release.set()
        _until(srv.admin_url, "softgate_admitted_rpcs", 0)


def test_the_served_certificate_expiry_is_exported(tmp_path: Path) -> None:
    """Every probe stays green while an expired certificate refuses every TLS client: the
    expiry is a metric an alert reads (SoftgateTLSCertExpiringSoon)."""
    trustme = pytest.importorskip("trustme")
    x509 = pytest.importorskip("cryptography.x509")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    settings = {"tls_cert": str(cert), "tls_key": str(key)}
    srv = ServerProcess(settings, tmp_path / "server.log", health_creds={"root": ca.cert_pem.bytes()})
    try:
        srv.start()
        expiry = x509.load_pem_x509_certificate(cert.read_bytes()).not_valid_after_utc.timestamp()
        assert _samples(srv.admin_url)["softgate_tls_cert_not_after_seconds"] == expiry
    finally:
        srv.stop()
