"""The hooks adapters call to report what they did; the Prometheus implementation lives in
`softgate.observability`. This no-op base keeps the engine and tests free of metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class Telemetry:
    """No-op telemetry. Every adapter calls these; subclasses export them."""

    # tokens of a loss result's ratio and gate weight that observe_loss reads (an evenly
    # strided sample, see `Engine.loss`); None: every token
    sample_tokens: int | None = 1

    def request_started(self, rpc: str, run: str, tokens: int) -> None:
        """A request entered the server (in-flight gauges go up)."""

    def request_finished(
        self,
        rpc: str,
        run: str,
        code: str,
        seconds: float | None,
        bytes_in: int,
        bytes_out: int,
        tokens: int,
        sequences: int,
        started: bool = True,
    ) -> None:
        """A request left the server with a gRPC status code name (e.g. "OK"); `seconds`: None
        for a call refused at admission (not timed); `started`: whether request_started was
        called for it (a call refused at admission was not)."""

    def rejected(self, rpc: str, reasons: list[str]) -> None:
        """A request was refused for bad input; `reasons` are short reason codes."""

    def busy(self, rpc: str) -> None:
        """A request was turned away RESOURCE_EXHAUSTED at max_concurrent_rpcs."""

    def observe_loss(self, run: str, config: Any, result: Any) -> None:
        """A loss was computed: `config` is the engine LossConfig, `result` its LossResult."""

    def observe_advantages(self, run: str, config: Any, result: Any) -> None:
        """Advantages were computed: `result` is the engine AdvantageResult."""

    def watch_engine(self, states: Callable[[], dict[str, int]]) -> None:
        """Report the engine's compiled configurations: `states()` counts them by state
        (CompiledKernel.states), read whenever the metrics are."""

    def watch_server(self, admitted: Callable[[], int], tls_not_after: Callable[[], float | None]) -> None:
        """Report the gRPC server's state, read whenever the metrics are: `admitted()` counts
        the calls holding a max_concurrent_rpcs slot, `tls_not_after()` is when the served
        certificate expires (Unix seconds; None without TLS)."""

    def kick(self) -> None:
        """The RPC whose results were reported has ended: work deferred until then may start."""
