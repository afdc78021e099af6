"""Prometheus export of softgate's telemetry: service metrics, trust-region statistics per
run / objective / advantage sign, and per-token distributions bucketed on the device.

    telemetry = PrometheusTelemetry(settings)      # private CollectorRegistry
    telemetry.observe_loss(run, config, result)    # called by the gRPC servicer
    telemetry.exposition()                         # what /metrics serves
"""

from softgate.observability.collector import exported_names
from softgate.observability.distributions import GATE_EDGES, RATIO_EDGES, SIGNS, Bucketer
from softgate.observability.runs import RunRegistry, sanitize_run
from softgate.observability.telemetry import PrometheusTelemetry

__all__ = [
    "GATE_EDGES",
    "RATIO_EDGES",
    "SIGNS",
    "Bucketer",
    "PrometheusTelemetry",
    "RunRegistry",
    "exported_names",
    "sanitize_run",
]
