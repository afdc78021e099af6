"""The runs a demo compares: an objective name from the engine plus its parameters.

A run is written ``name`` or ``name(key=value,...)``, e.g. ``sapo(tau_pos=1.05,tau_neg=1.0)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# The paper's settings (SAPO arXiv 2511.20347): GRPO eps 0.2 / 0.27, GSPO 3e-4 / 4e-4,
# SAPO tau_pos 1.0 / tau_neg 1.05.
DEFAULT_PARAMS: dict[str, dict[str, float]] = {
    "sapo": {"tau_pos": 1.0, "tau_neg": 1.05},
    "grpo": {"eps_low": 0.2, "eps_high": 0.27},
    "gspo": {"eps_low": 3e-4, "eps_high": 4e-4},
}

# The default comparison: the three objectives, plain importance sampling (no trust region) as
# the control, then the SAPO temperature ablation (tau_neg > tau_pos as in the paper against the
# reverse, at the paper's spread and wider).
DEFAULT_RUNS = (
    "sapo",
    "grpo",
    "gspo",
    "reinforce",
    "sapo(tau_pos=1.05,tau_neg=1.0)",
    "sapo(tau_pos=1.0,tau_neg=2.0)",
    "sapo(tau_pos=2.0,tau_neg=1.0)",
)

_RUN = re.compile(r"^\s*([a-z_]+)\s*(?:\((.*)\))?\s*$")


@dataclass(frozen=True)
class RunSpec:
    objective: str
    params: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.objective == "sapo":
            return f"sapo tau+={self.params['tau_pos']:g} tau-={self.params['tau_neg']:g}"
        if self.objective in ("grpo", "gspo", "gspo_token", "cispo", "gppo"):
            return f"{self.objective} eps={self.params['eps_low']:g}/{self.params['eps_high']:g}"
        extra = ",".join(f"{k}={v:g}" for k, v in sorted(self.params.items()))
        return f"{self.objective}({extra})" if extra else self.objective

    @property
    def key(self) -> str:
        """A file- and column-safe id, e.g. ``sapo_tp1_tn1.05``."""
        if self.objective == "sapo":
            return f"sapo_tp{self.params['tau_pos']:g}_tn{self.params['tau_neg']:g}"
        if set(self.params) == {"eps_low", "eps_high"}:
            return f"{self.objective}_el{self.params['eps_low']:g}_eh{self.params['eps_high']:g}"
        return "_".join([self.objective] + [f"{k}{v:g}" for k, v in sorted(self.params.items())])


def parse_run(text: str) -> RunSpec:
    m = _RUN.match(text)
    if not m:
        raise ValueError(f"cannot parse run {text!r}: expected name or name(key=value,...)")
    name, args = m.group(1), m.group(2)
    params = dict(DEFAULT_PARAMS.get(name, {}))
    if args and args.strip():
        for item in args.split(","):
            k, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"cannot parse {item!r} in {text!r}: expected key=value")
            try:
                params[k.strip()] = float(v)
            except ValueError:
                raise ValueError(
                    f"cannot parse {item!r} in {text!r}: {v.strip()!r} is not a number"
                ) from None
    return RunSpec(name, params)
