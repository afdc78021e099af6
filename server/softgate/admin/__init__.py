"""The admin HTTP API (FastAPI): /healthz, /readyz, /metrics, /v1/config, /v1/algorithms,
/v1/runs. `softgate.serve` runs it under uvicorn in the gRPC server's event loop."""

from softgate.admin.app import algorithm_catalogue, create_app

__all__ = ["algorithm_catalogue", "create_app"]
