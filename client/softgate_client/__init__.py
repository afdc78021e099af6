"""softgate_client: the light Python client of the softgate loss service.

Depends on grpcio, protobuf and numpy; torch is optional (the adapter
`softgate_client.torch.softgate_loss` imports it). Never imports the server package.
"""

from softgate_client._channel import RetryPolicy
from softgate_client.client import (
    RUN_METADATA_KEY,
    AdvantagesResult,
    LossResult,
    SoftgateClient,
    pack_batch,
)
from softgate_client.config import (
    AdvantageConfig,
    AggregationConfig,
    KLConfig,
    LossConfig,
    MismatchConfig,
    Objective,
    RejectionCriterion,
    RewardKLConfig,
    build_loss_config,
    kl_from_nemo_rl,
    kl_from_slime,
    kl_from_verl,
    rejection_from_verl,
    reward_kl_from_verl,
    veto_from_verl,
)
from softgate_client.errors import (
    DeadlineExceededError,
    FieldViolation,
    InvalidArgumentError,
    ResourceExhaustedError,
    SoftgateError,
    UnavailableError,
)

__version__ = "0.1.0"

__all__ = [
    "RUN_METADATA_KEY",
    "AdvantageConfig",
    "AdvantagesResult",
    "AggregationConfig",
    "DeadlineExceededError",
    "FieldViolation",
    "InvalidArgumentError",
    "KLConfig",
    "LossConfig",
    "LossResult",
    "MismatchConfig",
    "Objective",
    "RejectionCriterion",
    "ResourceExhaustedError",
    "RetryPolicy",
    "RewardKLConfig",
    "SoftgateClient",
    "SoftgateError",
    "UnavailableError",
    "build_loss_config",
    "kl_from_nemo_rl",
    "kl_from_slime",
    "kl_from_verl",
    "pack_batch",
    "rejection_from_verl",
    "reward_kl_from_verl",
    "veto_from_verl",
]
