"""The admin HTTP API: health, readiness, Prometheus metrics, configuration, the algorithm
catalogue and recent per-run trust-region statistics.

With `settings.admin_token` set, every route except /healthz and /readyz (the OpenAPI
document and docs pages included) requires `Authorization: Bearer <token>`; the token is
compared in constant time. Every error is a JSON body `{"error": {"code", "message"}}`
(`ErrorBody`). HEAD is answered wherever GET is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gzip
import hmac
import math
import typing
from collections.abc import Callable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from softgate import __version__
from softgate.telemetry import Telemetry

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECRET_WORDS = ("token", "secret", "password", "key", "credential")
_ERROR_BODY_REF = {"$ref": "#/components/schemas/ErrorBody"}


class ErrorDetail(BaseModel):
    """The `error` object of every error response."""

    model_config = ConfigDict(extra="forbid")
    code: int = Field(description="the HTTP status")
    message: str
    status: Literal["starting", "stopping"] | None = Field(None, description="/readyz: why not ready")
    run: str | None = Field(
        None, description='/v1/runs/{run}: the name asked for (one over 80 characters cut to 64 and "...")'
    )
    details: list[Any] | None = Field(None, description="a request that failed validation: why")


class ErrorBody(BaseModel):
    """Every error response's body, whatever the status: `{"error": {"code", "message", ...}}`."""

    model_config = ConfigDict(extra="forbid")
    error: ErrorDetail


def _error(
    http_status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": http_status, "message": message, **extra}}
    return JSONResponse(body, status_code=http_status, headers=headers)


def _allowed_methods(app: FastAPI, scope: Scope) -> str:
    """The methods the app serves at the scope's path, for a 405's Allow header."""
    methods: set[str] = set()
    for route in app.router.routes:
        if route.matches(scope)[0] is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding header (RFC 9110 12.5.3) lets a response be gzipped: gzip
    (or x-gzip, else `*`) listed with a q-value above 0."""
    q: dict[str, float] = {}
    for item in accept_encoding.lower().split(","):
        coding, *params = (p.strip() for p in item.split(";"))
        weight = 1.0
        for p in params:
            key, _, value = p.partition("=")
            if key.strip() == "q":
                try:
                    weight = float(value)
                except ValueError:
                    weight = 0.0  # (unreadable: not an acceptance)
                if not 0.0 <= weight <= 1.0:  # (a qvalue is in [0, 1]: q=5, inf, nan are not one)
                    weight = 0.0
        if coding:
            q[coding] = weight
    for coding in ("gzip", "x-gzip", "*"):
        if coding in q:
            return q[coding] > 0
    return False


def _exposition(telemetry: Telemetry, gzipped: bool) -> bytes:
    """The Prometheus text exposition, gzipped (level 1) if asked."""
    expo = getattr(telemetry, "exposition", None)
    body: bytes = expo() if callable(expo) else b""
    return gzip.compress(body, 1) if gzipped else body


def _token_of(settings: Any) -> str | None:
    tok = getattr(settings, "admin_token", None)
    if tok is None:
        return None
    if hasattr(tok, "get_secret_value"):
        tok = tok.get_secret_value()
    tok = str(tok)
    return tok or None


def _redacted(settings: Any) -> dict[str, Any]:
    if settings is None:
        return {}
    if hasattr(settings, "redacted"):
        return _jsonable(settings.redacted())
    if dataclasses.is_dataclass(settings) and not isinstance(settings, type):
        raw = dataclasses.asdict(settings)
    elif hasattr(settings, "model_dump"):
        raw = settings.model_dump()
    else:
        raw = {k: v for k, v in vars(settings).items() if not k.startswith("_")}
    return {
        k: ("***" if v and any(w in k.lower() for w in _SECRET_WORDS) else _jsonable(v))
        for k, v in raw.items()
    }


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set, frozenset)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    if hasattr(v, "get_secret_value"):
        return "***"
    return str(v)


# ---------------------------------------------------------------- algorithm catalogue


def _defaults(cls: type) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name == "name":
            continue
        if f.default is not dataclasses.MISSING:
            out[f.name] = _jsonable(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _jsonable(_describe(f.default_factory()))
        else:
            out[f.name] = None
    return out


def _describe(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        d = {k: _describe(v) for k, v in dataclasses.asdict(obj).items()}
        return d
    return obj


def _literal_options(cls: type, field_name: str) -> list[Any]:
    hints = typing.get_type_hints(cls)
    tp = hints.get(field_name)
    opts: list[Any] = []

    def walk(t: Any) -> None:
        origin = typing.get_origin(t)
        if origin is typing.Literal:
            opts.extend(typing.get_args(t))
        elif origin is not None:
            for a in typing.get_args(t):
                walk(a)

    walk(tp)
    return [o for o in opts if o is not None]


def _doc(cls: type) -> str:
    return " ".join((cls.__doc__ or "").split())


def algorithm_catalogue() -> dict[str, Any]:
    """Built from the engine's config dataclasses: nothing here is hand-maintained."""
    from softgate.engine import config as c

    objectives = {
        name: {"description": _doc(cls), "defaults": _defaults(cls)}
        for name, cls in sorted(c.OBJECTIVES.items())
    }
    loss_defaults = {
        f.name: _jsonable(f.default)
        for f in dataclasses.fields(c.LossConfig)
        if f.default is not dataclasses.MISSING
    }
    return {
        "objectives": objectives,
        "default_objective": c.LossConfig().objective.name,
        "advantages": {
            "description": _doc(c.AdvantageConfig),
            "estimators": _literal_options(c.AdvantageConfig, "estimator"),
            "scales": _literal_options(c.AdvantageConfig, "scale"),
            "defaults": _defaults(c.AdvantageConfig),
        },
        "aggregations": {
            "description": _doc(c.AggregationConfig),
            "modes": _literal_options(c.AggregationConfig, "mode"),
            "defaults": _defaults(c.AggregationConfig),
        },
        "kl": {
            "description": _doc(c.KLConfig),
            "estimators": _literal_options(c.KLConfig, "estimator"),
            "weights": _literal_options(c.KLConfig, "weight"),
            "defaults": _defaults(c.KLConfig),
        },
        "mismatch": {
            "description": _doc(c.MismatchConfig),
            "levels": _literal_options(c.MismatchConfig, "level"),
            "modes": _literal_options(c.MismatchConfig, "mode"),
            "defaults": _defaults(c.MismatchConfig),
        },
        "loss_defaults": loss_defaults,
    }


# ---------------------------------------------------------------- the app


def create_app(
    settings: Any,
    telemetry: Telemetry | None = None,
    is_ready: Callable[[], bool] | None = None,
    is_stopping: Callable[[], bool] | None = None,
) -> FastAPI:
    """The admin FastAPI app. `telemetry` is normally a PrometheusTelemetry (anything else
    serves an empty /metrics and no runs); `is_ready()` is true once the engine is warmed
    up and gRPC is serving, `is_stopping()` once a shutdown has begun."""
    token = _token_of(settings)
    token_bytes = token.encode() if token else None
    telemetry = telemetry if telemetry is not None else Telemetry()
    ready = is_ready or (lambda: True)
    catalogue = algorithm_catalogue()

    app = FastAPI(
        title="softgate admin",
        version=__version__,
        description=(
            "Health, readiness, Prometheus metrics, configuration, the algorithm catalogue and recent "
            "per-run trust-region statistics of a softgate loss server."
            + (
                " Every route but /healthz and /readyz needs `Authorization: Bearer <token>`."
                if token
                else ""
            )
        ),
    )

    @app.middleware("http")
    async def bearer_auth(request: Request, call_next: Callable[[Request], Any]) -> Response:
        if token_bytes is None or request.url.path in OPEN_PATHS:
            return await call_next(request)  # type: ignore[no-any-return]
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token_bytes)
        if not ok:
            return _error(
                401,
                "missing or invalid bearer token" if header else "authorization required",
                headers={"WWW-Authenticate": 'Bearer realm="softgate"'},
            )
        return await call_next(request)  # type: ignore[no-any-return]

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # (Starlette's names one route's methods: GET, not GET, HEAD)
            headers = {**(headers or {}), "Allow": _allowed_methods(app, request.scope)}
        return _error(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid request", details=_jsonable(exc.errors()))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}")

    @app.get("/healthz", tags=["health"], summary="Liveness: the process answers.")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: 200 once the engine is warmed up and gRPC is serving, else 503.",
        responses={503: {"model": ErrorBody, "description": "not ready: starting or stopping"}},
    )
    async def readyz() -> JSONResponse:
        try:
            ok = bool(ready())
        except Exception:
            ok = False
        if ok:
            return JSONResponse({"status": "ready"})
        try:
            stopping = is_stopping is not None and bool(is_stopping())
        except Exception:  # (a probe answers 503, never 500)
            stopping = False
        if stopping:  # (a drain read "warming up"; an audit)
            return _error(503, "not ready: shutting down, in-flight calls draining", status="stopping")
        return _error(503, "not ready: engine warming up or gRPC not serving yet", status="starting")

    building: dict[bool, asyncio.Future[bytes]] = {}  # /metrics' exposition in progress, by gzip

    # The telemetry reads (/metrics, /v1/runs, /v1/runs/{run}) run in a worker thread: `softgate
    # serve` runs this app on the event loop gRPC uses, and a read takes milliseconds to a tenth
    # of a second with many runs (an audit: polling /v1/runs held it 0.4 s a read, /healthz 1.7 s)
    @app.get(
        "/metrics",
        tags=["metrics"],
        summary="Prometheus text exposition.",
        response_class=Response,
        responses={200: {"content": {PROMETHEUS_CONTENT_TYPE: {}}}},
    )
    async def metrics(request: Request) -> Response:
        # Prometheus asks for gzip on every scrape: 18x smaller at 20 runs x 7 objectives (1.7 MB),
        # for 3 ms next to the exposition's 150. (prometheus_client's own test, "gzip" in the
        # header, also gzipped for `gzip;q=0`, a client's refusal of it)
        gzipped = accepts_gzip(request.headers.get("accept-encoding", ""))
        # one exposition at a time of each kind, shared by the reads that arrive while it is
        # built (an audit: 8 readers in a loop held each read 0.7-3.3 s at 20 runs x 7 objectives)
        task = building.get(gzipped)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.ensure_future(asyncio.to_thread(_exposition, telemetry, gzipped))
            building[gzipped] = task
            task.add_done_callback(lambda t: building.pop(gzipped) if building.get(gzipped) is t else None)
        body = await asyncio.shield(task)
        headers = {"Vary": "Accept-Encoding"} | ({"Content-Encoding": "gzip"} if gzipped else {})
        return Response(content=body, media_type=PROMETHEUS_CONTENT_TYPE, headers=headers)

    @app.get("/v1/config", tags=["config"], summary="The server settings, secrets redacted.")
    async def config() -> dict[str, Any]:
        return _redacted(settings)

    @app.get("/v1/algorithms", tags=["config"], summary="Objectives, estimators, aggregations with defaults.")
    async def algorithms() -> dict[str, Any]:
        return catalogue

    @app.get(
        "/v1/runs",
        tags=["runs"],
        summary="Runs seen recently, most recent first, with their last 10 batches.",
    )
    async def runs() -> dict[str, Any]:
        overview = getattr(telemetry, "runs_overview", None)
        return {
            "max_runs": getattr(telemetry, "max_runs", None),
            "runs": await asyncio.to_thread(overview) if callable(overview) else [],
        }

    @app.get(
        "/v1/runs/{run:path}",  # a run name may hold "/" (`team/exp-1`, or `team%2Fexp-1` encoded)
        tags=["runs"],
        summary="One run's statistics over windows (last 10 / 100 batches, last 5 min / 1 h).",
        responses={404: {"model": ErrorBody, "description": "unknown run"}},
    )
    async def run_detail(run: str) -> Any:
        if not run.strip():  # `/v1/runs/`, a URL built of an unset variable, read run `default`
            return _error(404, "no run name: GET /v1/runs/{run} (GET /v1/runs lists the runs)", run=run)
        summary = getattr(telemetry, "run_summary", None)
        data = await asyncio.to_thread(summary, run) if callable(summary) else None
        if data is None:  # (the name as given, cut: run labels are at most 64 characters)
            shown = run if len(run) <= 80 else run[:64] + "..."
            return _error(404, f"unknown run {shown!r}", run=shown)
        return data

    # HEAD wherever GET is (RFC 9110: GET's answer without its body; probes and load balancers
    # send either), as FastAPI's own /openapi.json and /docs do: routes of their own, out of the
    # schema, where they would repeat GET's operationId (a review)
    for route in [r for r in app.routes if isinstance(r, APIRoute) and "GET" in (r.methods or ())]:
        app.add_api_route(route.path, route.endpoint, methods=["HEAD"], include_in_schema=False)

    base_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's document, fitted to what the server sends: every error an ErrorBody, the
        401 on the routes behind the token, no 422 (FastAPI's for the path parameter `run`,
        which takes any string: it never happens, and its body would be an ErrorBody)."""
        if app.openapi_schema:
            return app.openapi_schema
        schema = base_openapi()
        components = schema.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        if token:
            components.setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
        for path, ops in schema.get("paths", {}).items():
            for op in ops.values():
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                if token and path not in OPEN_PATHS:
                    op["security"] = [{"bearer": []}]
                    responses["401"] = {
                        "description": "missing or invalid bearer token",
                        "content": {"application/json": {"schema": dict(_ERROR_BODY_REF)}},
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]

    return app
