"""Security: gRPC over TLS and mutual TLS (certificates generated at test time with trustme),
the admin API's bearer token, secrets kept out of logs and /v1/config, and the per-request
limits (tokens, sequences, groups, message size) refusing oversized work before allocating it.
"""

from __future__ import annotations

import json
import time
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from conftest import Certs, grpc_health
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb
from softgate_client.proto.softgate.v1 import softgate_pb2_grpc as pb_grpc

TOKEN = "sg-admin-7f3c9e1b2d4a6f80-do-not-log"


def _tensor(a: np.ndarray) -> pb.Tensor:
    dt = {np.dtype("<f4"): pb.DTYPE_FLOAT32, np.dtype("<i8"): pb.DTYPE_INT64}[a.dtype]
    return pb.Tensor(dtype=dt, shape=[a.size], data=a.tobytes())


def small_request(seqs: int = 2, length: int = 2, groups: int | None = None) -> pb.ComputeLossRequest:
    n = seqs * length
    req = pb.ComputeLossRequest()
    req.batch.logp.CopyFrom(_tensor(np.full(n, -1.0, "<f4")))
    req.batch.offsets.CopyFrom(_tensor(np.arange(0, n + 1, length, dtype="<i8")))
    req.batch.rewards.CopyFrom(_tensor((np.arange(seqs) % 2).astype("<f4")))
    gid = np.arange(seqs) // 2 if groups is None else np.arange(seqs) % groups
    req.batch.group_ids.CopyFrom(_tensor(gid.astype("<i8")))
    return req


def _loss(
    ch: grpc.Channel, req: pb.ComputeLossRequest | None = None, timeout: float = 10.0
) -> pb.ComputeLossResponse:
    return pb_grpc.LossServiceStub(ch).ComputeLoss(req or small_request(), timeout=timeout)


def _code(fn: Any) -> str:
    try:
        fn()
        return "OK"
    except grpc.RpcError as e:
        return str(e.code().name)


# ---------------------------------------------------------------- TLS and mutual TLS


@pytest.fixture(scope="module")
def tls_server(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import ServerProcess

    sp = ServerProcess(
        settings={
            "tls_cert": str(certs.server_cert),
            "tls_key": str(certs.server_key),
            "admin_port": "none",
            "log_format": "json",
        },
        log_path=tmp_path_factory.mktemp("tls") / "server.log",
        health_creds={"root": certs.ca_pem},
    )
    sp.start()
    yield sp
    sp.stop()


@pytest.fixture(scope="module")
def mtls_server(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import ServerProcess

    sp = ServerProcess(
        settings={
            "tls_cert": str(certs.server_cert),
            "tls_key": str(certs.server_key),
            "tls_client_ca": str(certs.ca_file),
            "admin_port": "none",
        },
        log_path=tmp_path_factory.mktemp("mtls") / "server.log",
        health_creds={"root": certs.ca_pem, "cert": certs.client_cert_pem, "key": certs.client_key_pem},
    )
    sp.start()
    yield sp
    sp.stop()


def test_tls_works(tls_server: Any, certs: Certs) -> None:
    with tls_server.channel(root=certs.ca_pem) as ch:
        assert grpc_health(ch) == "SERVING"
        assert np.isfinite(_loss(ch).loss)


def test_tls_through_the_client(tls_server: Any, certs: Certs) -> None:
    from softgate_client import SoftgateClient

    with SoftgateClient(
        tls_server.target, tls=True, root_certificates=certs.ca_pem, retries=1, timeout=20
    ) as c:
        r = c.loss(np.full((2, 3), -1.0, np.float32), rewards=[1.0, 0.0], group_ids=[0, 0])
        assert np.isfinite(r.loss) and r.grad.shape == (2, 3)


def test_plaintext_client_to_tls_server_fails(tls_server: Any) -> None:
    with tls_server.channel() as ch:
        assert _code(lambda: _loss(ch, timeout=5)) == "UNAVAILABLE"
    # gRPC C-core logs the failed handshake on stderr (`I1202 ... ssl_transport_security.cc:2563]
    # Handshake failed ...` with grpcio 1.85): with JSON logs every line is a JSON object, that one too
    deadline = time.monotonic() + 10
    while True:
        text = tls_server.logs()
        complete = text[: text.rfind("\n") + 1]  # (the server may be writing the last line)
        events = [json.loads(line) for line in complete.splitlines()]
        if any(e["logger"] == "softgate.native" for e in events):
            break
        assert time.monotonic() < deadline, tls_server.logs()[-3000:]
        time.sleep(0.1)


def test_tls_client_trusting_another_ca_fails(tls_server: Any, certs: Certs) -> None:
    with tls_server.channel(root=certs.other_ca_pem) as ch:
        assert _code(lambda: _loss(ch, timeout=5)) == "UNAVAILABLE"


def test_mtls_with_client_cert_works(mtls_server: Any, certs: Certs) -> None:
    with mtls_server.channel(root=certs.ca_pem, cert=certs.client_cert_pem, key=certs.client_key_pem) as ch:
        assert grpc_health(ch) == "SERVING"
        assert np.isfinite(_loss(ch).loss)


def test_mtls_without_client_cert_refused(mtls_server: Any, certs: Certs) -> None:
    with mtls_server.channel(root=certs.ca_pem) as ch:
        assert _code(lambda: _loss(ch, timeout=5)) == "UNAVAILABLE"
        assert _code(lambda: grpc_health(ch, timeout=5)) == "UNAVAILABLE"


def test_mtls_with_cert_of_another_ca_refused(mtls_server: Any, certs: Certs) -> None:
    with mtls_server.channel(
        root=certs.ca_pem, cert=certs.other_client_cert_pem, key=certs.other_client_key_pem
    ) as ch:
        assert _code(lambda: _loss(ch, timeout=5)) == "UNAVAILABLE"


def test_mtls_plaintext_refused(mtls_server: Any) -> None:
    with mtls_server.channel() as ch:
        assert _code(lambda: _loss(ch, timeout=5)) == "UNAVAILABLE"


# ---------------------------------------------------------------- the admin API's bearer token


@pytest.fixture(scope="module")
def admin_server(certs: Certs, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """TLS gRPC plus the admin API with a token, logging at DEBUG: the most talkative set-up."""
    from conftest import ServerProcess

    sp = ServerProcess(
        settings={
            "admin_token": TOKEN,
            "tls_cert": str(certs.server_cert),
            "tls_key": str(certs.server_key),
            "log_level": "DEBUG",
            "log_format": "json",
        },
        log_path=tmp_path_factory.mktemp("admin") / "server.log",
        health_creds={"root": certs.ca_pem},
    )
    sp.start()
    # some traffic, including a refused request, so that request paths log what they log
    with sp.channel(root=certs.ca_pem) as ch:
        _loss(ch)
        bad = small_request()
        bad.batch.logp.CopyFrom(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[10**12], data=b"\0" * 16))
        _code(lambda: _loss(ch, bad))
    yield sp
    sp.stop()


def _routes(sp: Any) -> list[str]:
    """Every GET route of the admin app, from its OpenAPI document (fetched with the token)."""
    r = httpx.get(sp.admin_url + "/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert r.status_code == 200
    paths = []
    for path, ops in r.json()["paths"].items():
        if "get" in ops:
            paths.append(path.replace("{run}", "default"))
    return [*paths, "/openapi.json", "/docs", "/redoc", "/no-such-route"]


BAD_AUTH: dict[str, dict[str, str]] = {
    "none": {},
    "wrong token": {"Authorization": "Bearer not-the-token"},
    "token prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
    "token plus suffix": {"Authorization": f"Bearer {TOKEN}x"},
    "basic scheme": {"Authorization": f"Basic {TOKEN}"},
    "no scheme": {"Authorization": TOKEN},
    "empty bearer": {"Authorization": "Bearer"},
    "token in another header": {"X-Api-Key": TOKEN},
}


def test_admin_routes_need_the_token(admin_server: Any) -> None:
    routes = _routes(admin_server)
    assert {"/metrics", "/v1/config", "/v1/algorithms", "/v1/runs"} <= set(routes), routes
    for path in routes:
        url = admin_server.admin_url + path
        for name, headers in BAD_AUTH.items():
            r = httpx.get(url, headers=headers, timeout=10)
            if path in ("/healthz", "/readyz"):
                assert r.status_code == 200, (path, name, r.status_code)
            else:
                assert r.status_code == 401, (path, name, r.status_code, r.text[:200])
                assert r.headers.get("www-authenticate", "").lower().startswith("bearer")
                assert TOKEN not in r.text
        ok = httpx.get(url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        expected = 404 if path in ("/no-such-route", "/v1/runs/default") else 200
        assert ok.status_code in (expected, 200), (path, ok.status_code)
    # other methods are refused before routing too
    r = httpx.post(admin_server.admin_url + "/v1/config", timeout=10)
    assert r.status_code == 401


def test_secrets_never_in_config_or_logs(admin_server: Any, certs: Certs) -> None:
    cfg = httpx.get(
        admin_server.admin_url + "/v1/config", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert cfg.status_code == 200
    body = cfg.text
    assert TOKEN not in body
    assert cfg.json()["admin_token"] == "***"
    key_pem = certs.server_key.read_text()
    key_body = [ln for ln in key_pem.splitlines() if ln and not ln.startswith("-----")]
    assert "PRIVATE KEY" not in body and not any(ln in body for ln in key_body)
    # stop the server so that its whole log (shutdown included) is on disk
    admin_server.stop()
    logs = admin_server.logs()
    assert "grpc_listening" in logs  # the log is the server's, at DEBUG
    assert TOKEN not in logs, "the admin token appeared in the server log"
    assert TOKEN[:12] not in logs
    assert "PRIVATE KEY" not in logs and not any(ln in logs for ln in key_body), "key material in the log"


# ---------------------------------------------------------------- per-request limits


LIMITS = {"max_tokens": 4096, "max_sequences": 64, "max_groups": 8, "max_message_bytes": 256 * 1024}


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from conftest import ServerProcess

    sp = ServerProcess(settings=dict(LIMITS), log_path=tmp_path_factory.mktemp("limits") / "server.log")
    sp.start()
    yield sp
    sp.stop()


def test_limit_defaults_documented() -> None:
    """The defaults that docs/reliability.md lists."""
    from softgate.settings import Settings

    s = Settings()
    assert (s.max_tokens, s.max_sequences, s.max_groups) == (64 << 20, 1 << 20, 1 << 20)
    assert s.max_message_bytes == 512 << 20
    assert s.max_concurrent_rpcs == 32
    assert s.grace_seconds == 30.0


def test_limits_advertised(limited_server: Any) -> None:
    with limited_server.channel() as ch:
        lim = pb_grpc.LossServiceStub(ch).ListAlgorithms(pb.ListAlgorithmsRequest(), timeout=10).limits
    assert (lim.max_tokens, lim.max_sequences, lim.max_groups, lim.max_message_bytes) == tuple(
        LIMITS.values()
    )


def _violations(e: grpc.RpcError) -> list[str]:
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    st = rpc_status.from_call(e)
    assert st is not None
    bad = error_details_pb2.BadRequest()
    for d in st.details:
        if d.Unpack(bad):
            return [f"{v.field}: {v.description}" for v in bad.field_violations]
    return []


@pytest.mark.parametrize(
    "what, req",
    [
        ("tokens", small_request(seqs=2, length=2049)),  # 4098 tokens > 4096, 16 KiB
        ("sequences", small_request(seqs=65, length=1, groups=8)),
        ("groups", small_request(seqs=18, length=1, groups=9)),
    ],
)
def test_over_limit_is_invalid_argument_too_large(
    limited_server: Any, what: str, req: pb.ComputeLossRequest
) -> None:
    with limited_server.channel() as ch:
        with pytest.raises(grpc.RpcError) as ei:
            _loss(ch, req)
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        vs = _violations(ei.value)
        assert any("too_large" in v for v in vs), vs
        # exactly at the limit is fine
        at = {
            "tokens": small_request(seqs=2, length=2048),
            "sequences": small_request(seqs=64, length=1, groups=8),
            "groups": small_request(seqs=16, length=1, groups=8),
        }[what]
        assert np.isfinite(_loss(ch, at).loss)


def test_stream_total_over_limit(limited_server: Any) -> None:
    """The token limit holds for a whole stream, each chunk being under it."""
    chunk = small_request(seqs=2, length=1024).batch  # 2048 tokens per chunk
    msgs = [pb.StreamLossRequest(chunk=chunk) for _ in range(3)]
    with limited_server.channel() as ch:
        with pytest.raises(grpc.RpcError) as ei:
            list(pb_grpc.LossServiceStub(ch).StreamLoss(iter(msgs), timeout=10))
        assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert any("too_large" in v for v in _violations(ei.value))
        assert len(list(pb_grpc.LossServiceStub(ch).StreamLoss(iter(msgs[:2]), timeout=10))) == 2


def test_message_over_limit_is_resource_exhausted(limited_server: Any) -> None:
    req = small_request(seqs=2, length=40_000)  # 320 KiB > 256 KiB, refused by gRPC before decoding
    with limited_server.channel() as ch:
        assert _code(lambda: _loss(ch, req)) == "RESOURCE_EXHAUSTED"
        assert grpc_health(ch) == "SERVING"


def test_huge_claims_refused_before_allocation(limited_server: Any) -> None:
    """Shapes claiming 10^12 elements (4 TB) with 16 bytes of data: refused in milliseconds,
    and the server's RSS does not move (nothing of the claimed size is allocated)."""
    rss0 = limited_server.rss()
    with limited_server.channel() as ch:
        for field in ("logp", "old_logp", "offsets", "rewards", "group_ids"):
            req = small_request()
            t = getattr(req.batch, field)
            t.shape[:] = [10**12]
            t0 = time.perf_counter()
            with pytest.raises(grpc.RpcError) as ei:
                _loss(ch, req)
            assert time.perf_counter() - t0 < 1.0
            assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
    assert limited_server.rss() - rss0 < 32 << 20
