"""Admin API through a real HTTP client against uvicorn on loopback."""

from __future__ import annotations

import concurrent.futures
import math
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import log_records, loss_result
from prometheus_client.parser import text_string_to_metric_families
from softgate.admin import create_app
from softgate.admin.server import ThreadedAdminServer
from softgate.engine import ESTIMATORS, KL_ESTIMATORS, OBJECTIVES, Grpo, LossConfig
from softgate.observability import PrometheusTelemetry
from softgate.settings import Settings
from softgate.telemetry import Telemetry

TOKEN = "s3cret-token"


def FakeSettings(admin_token: str | None = TOKEN) -> Settings:
    return Settings(admin_token=admin_token, max_runs=4, grpc_port=50051)


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[ThreadedAdminServer, PrometheusTelemetry, dict[str, bool]]]:
    settings = FakeSettings()
    tel = PrometheusTelemetry(settings)
    state = {"ready": False}
    app = create_app(settings, tel, lambda: state["ready"])
    with ThreadedAdminServer(app) as srv:
        yield srv, tel, state


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_health_and_readiness_need_no_token(server) -> None:
    srv, _, state = server
    state["ready"] = False
    with httpx.Client(base_url=srv.url, timeout=5) as c:
        r = c.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = c.get("/readyz")
        assert r.status_code == 503
        assert r.headers["content-type"].startswith("application/json")
        assert r.json()["error"]["code"] == 503 and r.json()["error"]["status"] == "starting"
        assert c.head("/readyz").status_code == 503
        state["ready"] = True
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json() == {"status": "ready"}
        # HEAD too: some probes and load balancers send it (it was 405)
        for path in ("/healthz", "/readyz"):
            r = c.head(path)
            assert r.status_code == 200 and r.content == b"", path
        # a wrong method: 405 in the JSON error format, with the HTTP error's Allow header
        r = c.post("/healthz")
        assert r.status_code == 405 and r.json()["error"]["code"] == 405
        assert "GET" in r.headers["allow"]


@pytest.mark.parametrize(
    "path",
    ["/metrics", "/v1/config", "/v1/algorithms", "/v1/runs", "/v1/runs/x", "/openapi.json", "/docs", "/nope"],
)
@pytest.mark.parametrize(
    "header",
    [None, "Bearer wrong-token", "Basic czNjcmV0LXRva2Vu", f"Bearer {TOKEN}x", "Bearer", f"bearer{TOKEN}"],
)
def test_every_other_route_requires_the_bearer_token(server, path: str, header: str | None) -> None:
    srv, _, _ = server
    headers = {"Authorization": header} if header is not None else {}
    r = httpx.get(srv.url + path, headers=headers, timeout=5)
    assert r.status_code == 401
    assert r.headers["content-type"].startswith("application/json")
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"]["code"] == 401
    assert TOKEN not in r.text


def test_routes_with_token(server) -> None:
    srv, tel, _ = server
    # (an objective with a clip: SAPO, the default, records no clip_low / clip_high)
    tel.observe_loss("run-a", LossConfig(objective=Grpo()), loss_result())
    tel.request_started("Loss", "run-a", 256)
    tel.request_finished("Loss", "run-a", "OK", 0.01, 1000, 2000, 256, 8)
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=5) as c:
        r = c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        names = {f.name for f in text_string_to_metric_families(r.text)}
        assert {"softgate_requests", "softgate_token_ratio", "softgate_batch_gate_saturation"} <= names

        cfg = c.get("/v1/config").json()
        assert cfg["admin_token"] == "***" and cfg["grpc_port"] == 50051
        assert TOKEN not in c.get("/v1/config").text

        alg = c.get("/v1/algorithms").json()
        assert set(alg["objectives"]) == set(OBJECTIVES)
        assert alg["default_objective"] == LossConfig().objective.name
        assert alg["objectives"]["sapo"]["defaults"] == {"tau_pos": 1.0, "tau_neg": 1.05}
        assert alg["objectives"]["grpo"]["defaults"]["eps_high"] == 0.2
        assert alg["objectives"]["gspo"]["defaults"] == {"eps_low": 3e-4, "eps_high": 4e-4, "dual_clip": None}
        assert alg["objectives"]["dro"]["defaults"] == {"coef": 0.05}
        assert set(alg["advantages"]["estimators"]) == set(ESTIMATORS)
        assert "seq_mean_token_mean" in alg["aggregations"]["modes"]
        assert alg["kl"]["estimators"] == list(KL_ESTIMATORS)
        assert alg["kl"]["weights"] == ["none", "ratio", "sampler_ratio", "score"]
        assert alg["kl"]["defaults"]["weight"] == "none"
        assert set(alg["mismatch"]["modes"]) == {"truncate", "mask", "seq_mask"}
        assert alg["loss_defaults"]["saturation_threshold"] == 0.5

        runs = c.get("/v1/runs").json()
        assert [r["run"] for r in runs["runs"]] == ["run-a"] and runs["max_runs"] == 4
        one = c.get("/v1/runs/run-a").json()
        w = one["windows"]["last_10_batches"]
        assert w["batches"] == 1
        assert w["gate_saturation_neg"] == pytest.approx(0.3)
        assert w["gate_saturation_pos"] == pytest.approx(0.02)
        assert w["clip_low"] == pytest.approx(0.1) and w["clip_high"] == pytest.approx(0.05)
        assert w["grad_retained"] == pytest.approx(0.85)
        assert w["approx_kl"] == pytest.approx(0.002)
        lo, hi = w["ratio_range"]
        assert lo <= 1.0 <= hi
        assert set(one["windows"]) == {"last_10_batches", "last_100_batches", "last_5m", "last_1h"}

        r = c.get("/v1/runs/missing-run")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == 404 and "missing-run" in r.json()["error"]["message"]
        r = c.get("/v1/runs/" + "x" * 20_000)  # (found by an audit: the name came back twice, whole)
        assert r.status_code == 404 and len(r.content) < 400 and r.json()["error"]["run"] == "x" * 64 + "..."
        # a name of up to 80 characters is given whole, a longer one cut
        assert c.get("/v1/runs/" + "r" * 80).json()["error"]["run"] == "r" * 80
        assert c.get("/v1/runs/" + "r" * 81).json()["error"]["run"] == "r" * 64 + "..."
        r = c.get("/no/such/route")
        assert r.status_code == 404 and r.json()["error"]["code"] == 404

        spec = c.get("/openapi.json").json()
        assert {
            "/healthz",
            "/readyz",
            "/metrics",
            "/v1/config",
            "/v1/algorithms",
            "/v1/runs",
            "/v1/runs/{run}",
        } <= set(spec["paths"])
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert c.get("/docs").status_code == 200


def test_an_evicted_run_leaves_the_runs_api() -> None:
    """Past max_runs the least recently active run is dropped, not folded into a run `other`
    (whose sudden history spiked every rate, an audit): /v1/runs lists the max_runs most recent
    runs, the evicted one is 404, and no run `other` appears."""
    settings = Settings(admin_token=None, max_runs=2, grpc_port=50051)
    tel = PrometheusTelemetry(settings)
    for run in ("a", "b", "c"):
        tel.observe_loss(run, LossConfig(), loss_result())
    app = create_app(settings, tel, lambda: True)
    with ThreadedAdminServer(app) as srv, httpx.Client(base_url=srv.url, timeout=5) as c:
        runs = c.get("/v1/runs").json()
        assert sorted(r["run"] for r in runs["runs"]) == ["b", "c"] and runs["max_runs"] == 2
        assert c.get("/v1/runs/a").status_code == 404
        assert c.get("/v1/runs/other").status_code == 404
        assert set(c.get("/v1/runs/c").json()) == {
            "run", "first_seen", "last_seen", "batches_recorded", "totals", "windows",
        }  # fmt: skip


def test_no_token_configured_means_open() -> None:
    settings = FakeSettings(admin_token=None)
    app = create_app(settings, PrometheusTelemetry(settings), lambda: True)
    with ThreadedAdminServer(app) as srv, httpx.Client(base_url=srv.url, timeout=5) as c:
        assert c.get("/metrics").status_code == 200
        assert c.get("/v1/config").json()["admin_token"] is None
        assert c.get("/readyz").status_code == 200


def test_readiness_probe_exception_is_not_ready() -> None:
    def boom() -> bool:
        raise RuntimeError("engine gone")

    app = create_app(FakeSettings(admin_token=None), None, boom)
    with ThreadedAdminServer(app) as srv:
        r = httpx.get(srv.url + "/readyz", timeout=5)
        assert r.status_code == 503
        # plain Telemetry: empty exposition and no runs, but the routes work
        assert httpx.get(srv.url + "/metrics", timeout=5).text == ""
        assert httpx.get(srv.url + "/v1/runs", timeout=5).json()["runs"] == []


def test_config_without_redacted_method_hides_secret_looking_fields() -> None:
    """Without a `redacted` method, a set field whose name reads as a secret (token, secret,
    password, key, credential) is redacted; inf and nan become strings (valid JSON)."""

    class Plain:
        def __init__(self) -> None:
            self.admin_token = None
            self.tls_key_password = "hunter2"
            self.api_key = "abc"
            self.port = 1
            self.timeout = math.inf
            self.ratio = math.nan

    app = create_app(Plain(), None, None)
    with ThreadedAdminServer(app) as srv:
        cfg = httpx.get(srv.url + "/v1/config", timeout=5).json()
        assert cfg == {
            "admin_token": None,
            "tls_key_password": "***",
            "api_key": "***",
            "port": 1,
            "timeout": "inf",
            "ratio": "nan",
        }


def test_an_unexpected_error_is_a_json_500() -> None:
    """A route that raises answers 500 with the JSON error body, naming only the exception type."""

    class Broken(Telemetry):
        def runs_overview(self) -> list[Any]:
            raise RuntimeError("secret detail")

    app = create_app(FakeSettings(admin_token=None), Broken(), lambda: True)
    with ThreadedAdminServer(app) as srv:
        r = httpx.get(srv.url + "/v1/runs", timeout=5)
    assert r.status_code == 500
    assert r.json() == {"error": {"code": 500, "message": "internal error: RuntimeError"}}


def test_run_names_with_a_slash_can_be_read_back() -> None:
    """docs/observability.md allows `/` in run names: /v1/runs/team/exp-1 and its encoded form
    /v1/runs/team%2Fexp-1 gave 404."""
    settings = FakeSettings(admin_token=None)
    tel = PrometheusTelemetry(settings)
    tel.observe_loss("team/exp-1", LossConfig(), loss_result())
    app = create_app(settings, tel, lambda: True)
    with ThreadedAdminServer(app) as srv, httpx.Client(base_url=srv.url, timeout=5) as c:
        assert [r["run"] for r in c.get("/v1/runs").json()["runs"]] == ["team/exp-1"]
        for path in ("/v1/runs/team/exp-1", "/v1/runs/team%2Fexp-1"):
            r = c.get(path)
            assert r.status_code == 200, (path, r.text)
            assert r.json()["run"] == "team/exp-1" and r.json()["batches_recorded"] == 1
        for path in ("/v1/runs/team", "/v1/runs/team/exp-1/x"):
            assert c.get(path).status_code == 404
        assert "/v1/runs/{run}" in c.get("/openapi.json").json()["paths"]


def test_the_openapi_spec_has_unique_operation_ids() -> None:
    """Found by a review: HEAD on /healthz and /readyz, added to the GET routes, gave both
    methods one operationId, which client generators refuse; HEAD stays out of the schema."""
    import warnings

    app = create_app(FakeSettings(admin_token=TOKEN), PrometheusTelemetry(FakeSettings()), lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = app.openapi()
    ids = [op["operationId"] for ops in spec["paths"].values() for op in ops.values() if isinstance(op, dict)]
    assert len(ids) == len(set(ids)), ids
    assert set(spec["paths"]["/healthz"]) == {"get"}


def test_the_openapi_spec_marks_only_protected_routes_as_needing_the_token() -> None:
    """/healthz and /readyz are open: the spec gives them no security and no 401."""
    app = create_app(Settings(admin_token=TOKEN), None, lambda: True)
    spec = app.openapi()
    for path, ops in spec["paths"].items():
        for op in ops.values():
            if path in ("/healthz", "/readyz"):
                assert "security" not in op and "401" not in op.get("responses", {}), path
            else:
                assert op["security"] == [{"bearer": []}] and "401" in op["responses"], path


def test_a_request_without_authorization_is_told_it_is_required() -> None:
    """no header -> "authorization required"; a wrong one -> "missing or invalid"."""
    app = create_app(Settings(admin_token=TOKEN), None, lambda: True)
    with ThreadedAdminServer(app) as srv, httpx.Client(base_url=srv.url, timeout=5) as c:
        none = c.get("/v1/config")
        wrong = c.get("/v1/config", headers={"Authorization": "Bearer nope"})
    assert none.status_code == wrong.status_code == 401
    assert none.json()["error"]["message"] == "authorization required"
    assert wrong.json()["error"]["message"] == "missing or invalid bearer token"


def test_telemetry_reads_run_off_the_event_loop() -> None:
    """Found by an audit: `softgate serve` runs the app on the event loop gRPC uses, and
    /v1/runs held it 0.4-2.5 s (small ComputeLoss p50 5 -> 19 ms, /healthz 1.7 s). /metrics
    and the run reads now run in a worker thread."""
    threads: list[int] = []

    class Recording(Telemetry):
        def exposition(self) -> bytes:
            threads.append(threading.get_ident())
            return b""

        def runs_overview(self) -> list[Any]:
            threads.append(threading.get_ident())
            return []

        def run_summary(self, run: str) -> dict[str, Any] | None:
            threads.append(threading.get_ident())
            return {"run": run}

    app = create_app(FakeSettings(admin_token=None), Recording(), lambda: True)
    with ThreadedAdminServer(app) as srv, httpx.Client(base_url=srv.url, timeout=5) as c:
        for path in ("/metrics", "/v1/runs", "/v1/runs/r"):
            assert c.get(path).status_code == 200, path
        loop_thread = srv.thread.ident
    assert len(threads) == 3 and loop_thread not in threads


def test_an_empty_run_name_is_not_found() -> None:
    """Found by an audit: /v1/runs/ and /v1/runs/%20 (a URL built of an unset variable)
    answered 200 with the run `default`."""
    settings = FakeSettings(admin_token=None)
    tel = PrometheusTelemetry(settings)
    tel.observe_loss("", LossConfig(), loss_result())  # no run name: `default`
    app = create_app(settings, tel, lambda: True)
    with ThreadedAdminServer(app) as srv, httpx.Client(base_url=srv.url, timeout=5) as c:
        for path in ("/v1/runs/", "/v1/runs/%20", "/v1/runs/%20%09"):
            r = c.get(path)
            assert r.status_code == 404, path
            assert r.json()["error"]["code"] == 404 and "no run name" in r.json()["error"]["message"]
        assert c.get("/v1/runs/default").json()["run"] == "default"


def test_metrics_are_gzipped_when_the_scraper_asks(server) -> None:
    """An audit: /metrics never compressed (1.8 MB a scrape at the documented cardinality,
    17x smaller gzipped) though Prometheus sends `Accept-Encoding: gzip` on every scrape."""
    srv, tel, _ = server
    for run in ("gz-a", "gz-b"):
        tel.observe_loss(run, LossConfig(), loss_result())
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=5) as c:
        plain = c.get("/metrics", headers={"Accept-Encoding": "identity"})
        packed = c.get("/metrics", headers={"Accept-Encoding": "gzip"})
    assert plain.status_code == packed.status_code == 200
    assert "content-encoding" not in plain.headers
    assert packed.headers["content-encoding"] == "gzip"
    for r in (plain, packed):  # (a cache must not hand one encoding to a client of the other)
        assert r.headers["vary"] == "Accept-Encoding"
        assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert packed.num_bytes_downloaded * 4 < plain.num_bytes_downloaded
    names = {f.name for f in text_string_to_metric_families(packed.text)}  # (httpx decompresses)
    assert names == {f.name for f in text_string_to_metric_families(plain.text)}
    assert "softgate_token_ratio" in names


@pytest.mark.parametrize(
    ("header", "gzipped"),
    [
        ("gzip", True),
        ("gzip, deflate, br", True),
        ("br;q=1.0, GZIP;q=0.5", True),
        ("x-gzip", True),
        ("*", True),
        ("", False),
        ("identity", False),
        ("gzip;q=0", False),  # "gzip" in the header, refused: prometheus_client's test gzipped it
        ("gzip; q=0.000", False),
        ("*;q=0.1, gzip;q=0", False),
        ("deflate, *;q=0", False),
        ("gzip;q=nonsense", False),
        ("gzip;q=5", False),
        ("gzip;q=nan", False),
    ],
)
def test_gzip_follows_the_accept_encoding_q_values(header: str, gzipped: bool) -> None:
    from softgate.admin.app import accepts_gzip

    assert accepts_gzip(header) is gzipped


def test_a_scraper_that_refuses_gzip_gets_plain_text(server) -> None:
    srv, _, _ = server
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=5) as c:
        r = c.get("/metrics", headers={"Accept-Encoding": "gzip;q=0, identity"})
    assert r.status_code == 200 and "content-encoding" not in r.headers


def test_metrics_are_compressed_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """gzip runs in the exposition's worker thread, not on the loop gRPC shares."""
    import gzip

    threads: list[int] = []
    compress = gzip.compress

    def recording(data: bytes, compresslevel: int = 9, **kw: Any) -> bytes:
        threads.append(threading.get_ident())
        return compress(data, compresslevel, **kw)

    class Text(Telemetry):
        def exposition(self) -> bytes:
            threads.append(threading.get_ident())
            return b"# TYPE x counter\nx_total 1.0\n" * 100

    monkeypatch.setattr(gzip, "compress", recording)
    app = create_app(FakeSettings(admin_token=None), Text(), lambda: True)
    with ThreadedAdminServer(app) as srv:
        r = httpx.get(srv.url + "/metrics", headers={"Accept-Encoding": "gzip"}, timeout=5)
        loop_thread = srv.thread.ident
    assert r.headers["content-encoding"] == "gzip" and r.text.startswith("# TYPE x counter")
    assert len(threads) == 2 and threads[0] == threads[1] and loop_thread not in threads


@pytest.mark.parametrize("token", [None, TOKEN])
def test_every_error_in_the_openapi_document_is_the_error_envelope(token: str | None) -> None:
    """An audit: /v1/runs/{run} declared FastAPI's 422 `{"detail": [...]}`, which never happens,
    and the errors that do (401, 404, 503) had no schema. Every non-2xx response now references
    ErrorBody, and the bodies the server sends validate against it."""
    from softgate.admin.app import ErrorBody

    ready = {"ok": False}
    app = create_app(Settings(admin_token=token), None, lambda: ready["ok"])
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    with ThreadedAdminServer(app) as srv, httpx.Client(base_url=srv.url, timeout=5) as c:
        spec = c.get("/openapi.json", headers=auth).json()
        sent = [c.get("/v1/runs/nope", headers=auth), c.get("/readyz"), c.post("/healthz")]
        if token:
            sent.append(c.get("/v1/config"))
    errors = {
        (path, status): response
        for path, ops in spec["paths"].items()
        for op in ops.values()
        for status, response in op["responses"].items()
        if not status.startswith("2")
    }
    for where, response in errors.items():
        schema = response["content"]["application/json"]["schema"]
        assert schema == {"$ref": "#/components/schemas/ErrorBody"}, where
    declared = {(path, int(status)) for path, status in errors}
    assert {("/v1/runs/{run}", 404), ("/readyz", 503)} <= declared
    protected = {path for path in spec["paths"] if path not in ("/healthz", "/readyz")}
    assert (
        {(path, 401) for path in protected} <= declared if token else not any(s == 401 for _, s in declared)
    )
    assert not any(s == 422 for _, s in declared)
    assert not {"HTTPValidationError", "ValidationError"} & set(spec["components"]["schemas"])
    assert [r.status_code for r in sent] == [404, 503, 405] + ([401] if token else [])
    for r in sent:
        ErrorBody.model_validate(r.json())  # (strict: a field it does not declare fails)


def test_head_is_answered_wherever_get_is_and_405_names_both(server) -> None:
    """An audit: POST /healthz said `Allow: GET` though HEAD is served there, and HEAD was 200
    on the probes and the docs but 405 on /metrics and /v1. HEAD now answers as GET does,
    without the body, on every route, and a 405's Allow lists GET and HEAD."""
    srv, tel, state = server
    state["ready"] = True
    tel.observe_loss("head-run", LossConfig(), loss_result())
    paths = ["/healthz", "/readyz", "/metrics", "/v1/config", "/v1/algorithms", "/v1/runs"]
    paths += ["/v1/runs/head-run", "/v1/runs/nope", "/openapi.json", "/docs"]
    with httpx.Client(base_url=srv.url, headers=AUTH, timeout=5) as c:
        for path in paths:
            get, head = c.get(path), c.head(path)
            assert head.status_code == get.status_code and head.content == b"", path
            for method in ("POST", "PUT", "DELETE", "OPTIONS"):
                r = c.request(method, path)
                assert r.status_code == 405 and r.json()["error"]["code"] == 405, (method, path)
                assert r.headers["allow"] == "GET, HEAD", (method, path)
        assert c.head("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this host has no IPv6 loopback")
@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_the_threaded_server_runs_on_ipv6(host: str) -> None:
    """An audit: ThreadedAdminServer(app, host="::1") raised (its port was picked on an IPv4
    socket), and its url read http://::1:PORT, which no client parses."""
    app = create_app(FakeSettings(admin_token=None), None, lambda: True)
    srv = ThreadedAdminServer(app, host=host)
    assert srv.port > 0 and srv.url == f"http://[::1]:{srv.port}"
    with srv:
        assert httpx.get(srv.url + "/healthz", timeout=5).json() == {"status": "ok"}


def test_the_threaded_server_holds_its_port_from_construction() -> None:
    """port=0 picked a free port, let it go and bound it again at start: two servers starting
    at once could be handed the same port. The socket is now bound once, when it is made."""
    app = create_app(FakeSettings(admin_token=None), None, lambda: True)
    srv = ThreadedAdminServer(app)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", srv.port))
    with srv:
        assert httpx.get(srv.url + "/healthz", timeout=5).status_code == 200


def test_the_threaded_server_logs_upgrade_and_invalid_requests_at_debug() -> None:
    """As `softgate serve` does (tests/test_logging.py): uvicorn's warnings about a client's
    Upgrade header or invalid HTTP are DEBUG records."""
    import logging

    logging.getLogger("uvicorn.error").filters.clear()  # (one an earlier server added)
    app = create_app(FakeSettings(admin_token=None), None, lambda: True)
    with ThreadedAdminServer(app) as srv, log_records("uvicorn.error") as records:
        for request in (
            b"GET /healthz HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
            b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n",
        ):
            with socket.create_connection((srv.host, srv.port), timeout=5) as s:
                s.sendall(request)
                assert s.recv(100).startswith(b"HTTP/1.1 ")
    levels = {r.getMessage(): r.levelname for r in records.records}
    assert levels["Unsupported upgrade request."] == levels["Invalid HTTP request received."] == "DEBUG"
    assert "WARNING" not in levels.values(), levels


def test_the_threaded_server_on_an_empty_host_serves_every_address() -> None:
    """A review: host="" had served every address; binding the socket itself made it an
    OSError (getaddrinfo("") without AI_PASSIVE)."""
    app = create_app(FakeSettings(admin_token=None), None, lambda: True)
    with ThreadedAdminServer(app, host="") as srv:
        assert srv.url == f"http://127.0.0.1:{srv.port}"
        assert httpx.get(srv.url + "/healthz", timeout=5).json() == {"status": "ok"}


def test_readiness_with_a_stopping_check_that_raises_is_not_ready() -> None:
    """An audit: `is_stopping` raising answered /readyz 500 (a probe reads 503)."""

    def boom() -> bool:
        raise RuntimeError("gone")

    app = create_app(FakeSettings(admin_token=None), None, lambda: False, boom)
    with ThreadedAdminServer(app) as srv:
        r = httpx.get(srv.url + "/readyz", timeout=5)
    assert r.status_code == 503 and r.json()["error"]["status"] == "starting"


def test_concurrent_scrapes_share_one_exposition() -> None:
    """An audit: every read of /metrics built its own exposition (0.3 s of the GIL at 20 runs
    x 7 objectives), so readers in a loop slowed the server's event loop; reads that arrive
    while one is built now share it, and a later read builds a fresh one."""
    built: list[int] = []

    class Slow(Telemetry):
        def exposition(self) -> bytes:
            built.append(1)
            time.sleep(1.0)
            return f"softgate_x {len(built)}\n".encode()

    app = create_app(FakeSettings(admin_token=None), Slow(), lambda: True)
    with ThreadedAdminServer(app) as srv:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            bodies = list(pool.map(lambda _: httpx.get(srv.url + "/metrics", timeout=10).text, range(6)))
        assert len(built) < 6 and set(bodies) <= {f"softgate_x {i}\n" for i in range(1, len(built) + 1)}
        assert httpx.get(srv.url + "/metrics", timeout=10).text == f"softgate_x {len(built)}\n"


def test_a_start_that_fails_leaves_no_server_serving() -> None:
    """An audit: start() raising on its timeout left the thread serving on its port."""
    srv = ThreadedAdminServer(create_app(FakeSettings(admin_token=None), None, lambda: True))

    class Slow(type(srv.server)):  # type: ignore[misc]
        """It serves, but says it has not started yet (a start slower than the timeout; a
        timeout alone raced a fast start on CI)."""

        started = property(lambda self: False, lambda self, value: None)

    srv.server.__class__ = Slow
    with pytest.raises(RuntimeError, match="did not start"):
        srv.start(timeout=0.5)
    assert not srv.thread.is_alive()
    with pytest.raises(httpx.TransportError):
        httpx.get(srv.url + "/healthz", timeout=2)


def test_stalled_and_surplus_connections_are_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """An audit: uvicorn times a connection out only after a response, so 400 silent (or
    trickling) connections used up a 256-descriptor process and took its gRPC port down too.
    One that has not sent whole headers in HEADER_TIMEOUT_S is closed, and so is one past
    MAX_CONNECTIONS; a request that did arrive is answered, and its keep-alive reused."""
    import softgate.admin.server as admin_server

    monkeypatch.setattr(admin_server, "HEADER_TIMEOUT_S", 1.5)
    monkeypatch.setattr(admin_server, "MAX_CONNECTIONS", 3)
    app = create_app(Settings(), Telemetry(), lambda: True)

    @app.get("/slow")
    def slow() -> dict[str, bool]:
        time.sleep(2.0)  # (longer than the header timeout)
        return {"ok": True}

    def closed_within(sock: socket.socket, seconds: float) -> bool:
        sock.settimeout(seconds)
        try:
            return sock.recv(1) == b""
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True

    with (
        ThreadedAdminServer(app) as srv,
        socket.create_connection(("127.0.0.1", srv.port)) as silent,
        socket.create_connection(("127.0.0.1", srv.port)) as trickle,
        httpx.Client(base_url=srv.url) as client,
    ):
        assert client.get("/healthz").status_code == 200  # (the third connection)
        with socket.create_connection(("127.0.0.1", srv.port)) as surplus:
            assert closed_within(surplus, 0.5)  # (the fourth: closed when accepted, long before 1.5 s)
        trickle.sendall(b"GET /healthz HTTP/1.1\r\n")
        time.sleep(0.2)
        trickle.sendall(b"Host: x\r\n")  # (headers still not whole)
        assert closed_within(silent, 3.0) and closed_within(trickle, 3.0)
        # a request pipelined behind a quick one, answered past the timeout, is not cut (a review)
        client.close()
        with socket.create_connection(("127.0.0.1", srv.port)) as piped:
            piped.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            piped.settimeout(5.0)
            got = b""
            while b'{"ok":true}' not in got:
                part = piped.recv(65536)
                assert part, got  # (closed before the slow answer)
                got += part


def test_health_asks_the_server_directly_whatever_the_proxy(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """An audit: `softgate health` went through http_proxy where one was set, and the images'
    HEALTHCHECK called a healthy server unhealthy (the proxy here refuses every connection)."""
    from softgate.status import check, write_status

    for var in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    with ThreadedAdminServer(create_app(Settings(), Telemetry(), lambda: True)) as srv:
        path = str(tmp_path / "status.json")
        write_status(path, ("127.0.0.1", 1), ("127.0.0.1", srv.port))
        assert check(path) is None
