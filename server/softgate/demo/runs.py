"""The runs a demo compares: an objective name from the engine plus its parameters.

A run is written ``name`` or ``name(key=value,...)``, e.g. ``sapo(tau_pos=1.05,tau_neg=1.0)``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from softgate.engine.config import OBJECTIVES, LossConfig
from softgate.engine.validation import validate_config

# The paper's settings (SAPO arXiv 2511.20347): GRPO eps 0.2 / 0.27, GSPO 3e-4 / 4e-4,
# SAPO tau_pos 1.0 / tau_neg 1.05. Every other parameter takes the engine's default.
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


def _num(v: float) -> str:
    """`v` to 6 significant digits, or every digit where 6 would not give `v` back: 0.2 and
    0.2000001 both read 0.2, and their runs shared one key, so one row (an audit)."""
    short = format(v, "g")
    return short if float(short) == v else repr(v)


@dataclass(frozen=True)
class RunSpec:
    objective: str
    params: dict[str, float] = field(default_factory=dict)

    def _parts(self, tau: tuple[str, str], eps: tuple[str, str], sep: str) -> list[str]:
        p = dict(self.params)
        parts = [self.objective]
        # any objective's parameters (an audit: cispo's label read eps_low it did not have)
        if "tau_pos" in p and "tau_neg" in p:
            parts += [f"{tau[0]}{_num(p.pop('tau_pos'))}", f"{tau[1]}{_num(p.pop('tau_neg'))}"]
        if "eps_low" in p and "eps_high" in p:
            parts += [f"{eps[0]}{_num(p.pop('eps_low'))}{eps[1]}{_num(p.pop('eps_high'))}"]
        # (an integer as it is: a seed of 12345678 read 1.23457e+07, as 12345679 did)
        return parts + [f"{k}{sep}{v if isinstance(v, int) else _num(v)}" for k, v in sorted(p.items())]

    def call_params(self, call: int) -> dict[str, float]:
        """The parameters of the run's `call`-th loss call (from 0): clip_cov's seed advanced by
        the call, a new draw each call (the same seed would drop the same positions of every
        batch of one layout)."""
        if self.objective != "clip_cov":
            return self.params
        return {**self.params, "seed": (int(self.params.get("seed", 0)) + call) % 2**64}

    @property
    def label(self) -> str:
        """For tables and legends, e.g. ``sapo tau+=1 tau-=1.05``, ``grpo eps=0.2/0.27``."""
        return " ".join(self._parts(("tau+=", "tau-="), ("eps=", "/"), "="))

    @property
    def key(self) -> str:
        """A file- and column-safe id, e.g. ``sapo_tp1_tn1.05``, ``grpo_el0.2_eh0.27``."""
        return "_".join(self._parts(("tp", "tn"), ("el", "_eh"), ""))


def parse_run(text: str) -> RunSpec:
    """A run from its text, checked as the engine checks its configuration (ValueError: the
    unknown name or parameter, the value out of range), so a bad run stops before training."""
    m = _RUN.match(text)
    if not m:
        raise ValueError(f"cannot parse run {text!r}: expected name or name(key=value,...)")
    name, args = m.group(1), m.group(2)
    cls = OBJECTIVES.get(name)
    if cls is None:
        raise ValueError(f"unknown objective {name!r} in {text!r}; known: {', '.join(sorted(OBJECTIVES))}")
    fields = [f for f in dataclasses.fields(cls) if f.name != "name"]
    names = [f.name for f in fields]
    params = {f.name: f.default for f in fields if isinstance(f.default, float)}
    params.update(DEFAULT_PARAMS.get(name, {}))
    given: set[str] = set()
    if args and args.strip():
        for item in args.split(","):
            k, sep, v = item.partition("=")
            if not sep:
                raise ValueError(f"cannot parse {item!r} in {text!r}: expected key=value")
            if k.strip() not in names:
                known = ", ".join(names) or "none"
                raise ValueError(
                    f"{name} has no parameter {k.strip()!r} (in {text!r}); its parameters: {known}"
                )
            # (an audit: sapo(tau_pos=1,tau_pos=2) ran with the last value, silently)
            if k.strip() in given:
                raise ValueError(f"{name}'s parameter {k.strip()!r} is given twice in {text!r}")
            given.add(k.strip())
            integer = k.strip() == "seed"  # (clip_cov's, a uint64)
            try:
                params[k.strip()] = int(v) if integer else float(v)
            except ValueError:
                raise ValueError(
                    f"cannot parse {item!r} in {text!r}: {v.strip()!r} is not {'an integer' if integer else 'a number'}"
                ) from None
    violations = validate_config(LossConfig(objective=cls(**params)))
    if violations:
        raise ValueError(f"invalid run {text!r}: " + "; ".join(str(v) for v in violations))
    return RunSpec(name, params)


def parse_runs(texts: list[str]) -> list[RunSpec]:
    """The runs of --objectives, each by `parse_run`; a run given twice (in any spelling, e.g.
    ``sapo`` and ``sapo(tau_pos=1.0)``) is refused (ValueError): the report groups runs by key,
    and a repeat's seeds were counted twice into one row and its standard error (an audit)."""
    first: dict[str, str] = {}
    specs = []
    for text in texts:
        spec = parse_run(text)
        if spec.key in first:
            raise ValueError(f"--objectives: {text!r} is the same run as {first[spec.key]!r} ({spec.key})")
        first[spec.key] = text
        specs.append(spec)
    return specs
