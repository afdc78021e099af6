"""The transport-free loss engine: pure torch math over ragged batches.

Usage::

    >>> from softgate.engine import Engine, Batch, LossConfig, Sapo
    >>> result = Engine().loss(batch, LossConfig(objective=Sapo(tau_pos=1.0, tau_neg=1.05)))

See docs/engine.md for the contract details (dtype rule, undefined metrics, peers).
"""

from softgate.engine.batch import Batch
from softgate.engine.config import (
    ESTIMATORS,
    KL_ESTIMATORS,
    OBJECTIVES,
    AdvantageConfig,
    AggregationConfig,
    Cispo,
    CispoSeq,
    ClipCov,
    DppoKl,
    DppoTv,
    Dro,
    Gmpo,
    Gppo,
    Grpo,
    Gspo,
    GspoToken,
    KLConfig,
    KlCov,
    LossConfig,
    MismatchConfig,
    Objective,
    Reinforce,
    RejectionCriterion,
    RewardKLConfig,
    Sapo,
    SapoSeq,
)
from softgate.engine.engine import Engine
from softgate.engine.errors import FieldViolation, InputError
from softgate.engine.loss import compute_loss
from softgate.engine.metrics import METRIC_NAMES
from softgate.engine.result import AdvantageResult, LossResult

__all__ = [
    "ESTIMATORS",
    "KL_ESTIMATORS",
    "METRIC_NAMES",
    "OBJECTIVES",
    "AdvantageConfig",
    "AdvantageResult",
    "AggregationConfig",
    "Batch",
    "Cispo",
    "CispoSeq",
    "ClipCov",
    "DppoKl",
    "DppoTv",
    "Dro",
    "Engine",
    "FieldViolation",
    "Gmpo",
    "Gppo",
    "Grpo",
    "Gspo",
    "GspoToken",
    "InputError",
    "KLConfig",
    "KlCov",
    "LossConfig",
    "LossResult",
    "MismatchConfig",
    "Objective",
    "Reinforce",
    "RejectionCriterion",
    "RewardKLConfig",
    "Sapo",
    "SapoSeq",
    "compute_loss",
]
