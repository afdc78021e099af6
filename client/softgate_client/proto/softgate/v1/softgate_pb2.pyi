from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Iterable as _Iterable, Mapping as _Mapping, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT64: _ClassVar[Dtype]
    DTYPE_INT64: _ClassVar[Dtype]
    DTYPE_INT32: _ClassVar[Dtype]
    DTYPE_BOOL: _ClassVar[Dtype]
    DTYPE_UINT8: _ClassVar[Dtype]
    DTYPE_INT8: _ClassVar[Dtype]
    DTYPE_INT16: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]

class AdvantageLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADVANTAGE_LEVEL_UNSPECIFIED: _ClassVar[AdvantageLevel]
    ADVANTAGE_LEVEL_SEQUENCE: _ClassVar[AdvantageLevel]
    ADVANTAGE_LEVEL_TOKEN: _ClassVar[AdvantageLevel]

class AdvantageEstimator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADVANTAGE_ESTIMATOR_UNSPECIFIED: _ClassVar[AdvantageEstimator]
    ADVANTAGE_ESTIMATOR_GRPO: _ClassVar[AdvantageEstimator]
    ADVANTAGE_ESTIMATOR_DR_GRPO: _ClassVar[AdvantageEstimator]
    ADVANTAGE_ESTIMATOR_RLOO: _ClassVar[AdvantageEstimator]
    ADVANTAGE_ESTIMATOR_REINFORCE_PP_BASELINE: _ClassVar[AdvantageEstimator]
    ADVANTAGE_ESTIMATOR_OPO: _ClassVar[AdvantageEstimator]
    ADVANTAGE_ESTIMATOR_GPG: _ClassVar[AdvantageEstimator]
    ADVANTAGE_ESTIMATOR_GRPO_PASSK: _ClassVar[AdvantageEstimator]
    ADVANTAGE_ESTIMATOR_REINFORCE_PP: _ClassVar[AdvantageEstimator]
    ADVANTAGE_ESTIMATOR_GDPO: _ClassVar[AdvantageEstimator]
    ADVANTAGE_ESTIMATOR_OPTIMAL_TOKEN_BASELINE: _ClassVar[AdvantageEstimator]

class TokenPosition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_POSITION_UNSPECIFIED: _ClassVar[TokenPosition]
    TOKEN_POSITION_TOKEN: _ClassVar[TokenPosition]
    TOKEN_POSITION_TRAINED: _ClassVar[TokenPosition]

class AdvantageScale(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ADVANTAGE_SCALE_UNSPECIFIED: _ClassVar[AdvantageScale]
    ADVANTAGE_SCALE_GROUP: _ClassVar[AdvantageScale]
    ADVANTAGE_SCALE_BATCH: _ClassVar[AdvantageScale]
    ADVANTAGE_SCALE_NONE: _ClassVar[AdvantageScale]
    ADVANTAGE_SCALE_LEAVE_ONE_OUT: _ClassVar[AdvantageScale]

class AggregationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_MODE_UNSPECIFIED: _ClassVar[AggregationMode]
    AGGREGATION_MODE_TOKEN_MEAN: _ClassVar[AggregationMode]
    AGGREGATION_MODE_SEQ_MEAN_TOKEN_MEAN: _ClassVar[AggregationMode]
    AGGREGATION_MODE_SEQ_MEAN_TOKEN_SUM: _ClassVar[AggregationMode]
    AGGREGATION_MODE_TOKEN_SUM_NORM: _ClassVar[AggregationMode]

class KlEstimator(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KL_ESTIMATOR_UNSPECIFIED: _ClassVar[KlEstimator]
    KL_ESTIMATOR_K1: _ClassVar[KlEstimator]
    KL_ESTIMATOR_K2: _ClassVar[KlEstimator]
    KL_ESTIMATOR_K3: _ClassVar[KlEstimator]
    KL_ESTIMATOR_K1_ST: _ClassVar[KlEstimator]
    KL_ESTIMATOR_K3_ST: _ClassVar[KlEstimator]
    KL_ESTIMATOR_K3_IS: _ClassVar[KlEstimator]
    KL_ESTIMATOR_ABS: _ClassVar[KlEstimator]
    KL_ESTIMATOR_ABS_ST: _ClassVar[KlEstimator]
    KL_ESTIMATOR_K3_IS_SEQ: _ClassVar[KlEstimator]

class KlWeight(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KL_WEIGHT_UNSPECIFIED: _ClassVar[KlWeight]
    KL_WEIGHT_NONE: _ClassVar[KlWeight]
    KL_WEIGHT_RATIO: _ClassVar[KlWeight]
    KL_WEIGHT_SAMPLER_RATIO: _ClassVar[KlWeight]
    KL_WEIGHT_SCORE: _ClassVar[KlWeight]

class RewardKlLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REWARD_KL_LEVEL_UNSPECIFIED: _ClassVar[RewardKlLevel]
    REWARD_KL_LEVEL_TOKEN: _ClassVar[RewardKlLevel]
    REWARD_KL_LEVEL_SEQUENCE: _ClassVar[RewardKlLevel]
    REWARD_KL_LEVEL_IMMEDIATE: _ClassVar[RewardKlLevel]

class MismatchLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MISMATCH_LEVEL_UNSPECIFIED: _ClassVar[MismatchLevel]
    MISMATCH_LEVEL_TOKEN: _ClassVar[MismatchLevel]
    MISMATCH_LEVEL_SEQUENCE: _ClassVar[MismatchLevel]
    MISMATCH_LEVEL_GEOMETRIC: _ClassVar[MismatchLevel]

class MismatchMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MISMATCH_MODE_UNSPECIFIED: _ClassVar[MismatchMode]
    MISMATCH_MODE_TRUNCATE: _ClassVar[MismatchMode]
    MISMATCH_MODE_MASK: _ClassVar[MismatchMode]
    MISMATCH_MODE_SEQ_MASK: _ClassVar[MismatchMode]

class RejectionStatistic(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECTION_STATISTIC_UNSPECIFIED: _ClassVar[RejectionStatistic]
    REJECTION_STATISTIC_K1: _ClassVar[RejectionStatistic]
    REJECTION_STATISTIC_K2: _ClassVar[RejectionStatistic]
    REJECTION_STATISTIC_K3: _ClassVar[RejectionStatistic]
    REJECTION_STATISTIC_BINARY_KL: _ClassVar[RejectionStatistic]
    REJECTION_STATISTIC_K3_REVERSE: _ClassVar[RejectionStatistic]

class RejectionLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REJECTION_LEVEL_UNSPECIFIED: _ClassVar[RejectionLevel]
    REJECTION_LEVEL_TOKEN: _ClassVar[RejectionLevel]
    REJECTION_LEVEL_SEQ_SUM: _ClassVar[RejectionLevel]
    REJECTION_LEVEL_SEQ_MEAN: _ClassVar[RejectionLevel]
    REJECTION_LEVEL_SEQ_MAX: _ClassVar[RejectionLevel]
    REJECTION_LEVEL_SEQ_MIN: _ClassVar[RejectionLevel]

class OffPolicyMaskReference(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OFF_POLICY_MASK_REFERENCE_UNSPECIFIED: _ClassVar[OffPolicyMaskReference]
    OFF_POLICY_MASK_REFERENCE_ROLLOUT: _ClassVar[OffPolicyMaskReference]
    OFF_POLICY_MASK_REFERENCE_OLD: _ClassVar[OffPolicyMaskReference]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT64: Dtype
DTYPE_INT64: Dtype
DTYPE_INT32: Dtype
DTYPE_BOOL: Dtype
DTYPE_UINT8: Dtype
DTYPE_INT8: Dtype
DTYPE_INT16: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
ADVANTAGE_LEVEL_UNSPECIFIED: AdvantageLevel
ADVANTAGE_LEVEL_SEQUENCE: AdvantageLevel
ADVANTAGE_LEVEL_TOKEN: AdvantageLevel
ADVANTAGE_ESTIMATOR_UNSPECIFIED: AdvantageEstimator
ADVANTAGE_ESTIMATOR_GRPO: AdvantageEstimator
ADVANTAGE_ESTIMATOR_DR_GRPO: AdvantageEstimator
ADVANTAGE_ESTIMATOR_RLOO: AdvantageEstimator
ADVANTAGE_ESTIMATOR_REINFORCE_PP_BASELINE: AdvantageEstimator
ADVANTAGE_ESTIMATOR_OPO: AdvantageEstimator
ADVANTAGE_ESTIMATOR_GPG: AdvantageEstimator
ADVANTAGE_ESTIMATOR_GRPO_PASSK: AdvantageEstimator
ADVANTAGE_ESTIMATOR_REINFORCE_PP: AdvantageEstimator
ADVANTAGE_ESTIMATOR_GDPO: AdvantageEstimator
ADVANTAGE_ESTIMATOR_OPTIMAL_TOKEN_BASELINE: AdvantageEstimator
TOKEN_POSITION_UNSPECIFIED: TokenPosition
TOKEN_POSITION_TOKEN: TokenPosition
TOKEN_POSITION_TRAINED: TokenPosition
ADVANTAGE_SCALE_UNSPECIFIED: AdvantageScale
ADVANTAGE_SCALE_GROUP: AdvantageScale
ADVANTAGE_SCALE_BATCH: AdvantageScale
ADVANTAGE_SCALE_NONE: AdvantageScale
ADVANTAGE_SCALE_LEAVE_ONE_OUT: AdvantageScale
AGGREGATION_MODE_UNSPECIFIED: AggregationMode
AGGREGATION_MODE_TOKEN_MEAN: AggregationMode
AGGREGATION_MODE_SEQ_MEAN_TOKEN_MEAN: AggregationMode
AGGREGATION_MODE_SEQ_MEAN_TOKEN_SUM: AggregationMode
AGGREGATION_MODE_TOKEN_SUM_NORM: AggregationMode
KL_ESTIMATOR_UNSPECIFIED: KlEstimator
KL_ESTIMATOR_K1: KlEstimator
KL_ESTIMATOR_K2: KlEstimator
KL_ESTIMATOR_K3: KlEstimator
KL_ESTIMATOR_K1_ST: KlEstimator
KL_ESTIMATOR_K3_ST: KlEstimator
KL_ESTIMATOR_K3_IS: KlEstimator
KL_ESTIMATOR_ABS: KlEstimator
KL_ESTIMATOR_ABS_ST: KlEstimator
KL_ESTIMATOR_K3_IS_SEQ: KlEstimator
KL_WEIGHT_UNSPECIFIED: KlWeight
KL_WEIGHT_NONE: KlWeight
KL_WEIGHT_RATIO: KlWeight
KL_WEIGHT_SAMPLER_RATIO: KlWeight
KL_WEIGHT_SCORE: KlWeight
REWARD_KL_LEVEL_UNSPECIFIED: RewardKlLevel
REWARD_KL_LEVEL_TOKEN: RewardKlLevel
REWARD_KL_LEVEL_SEQUENCE: RewardKlLevel
REWARD_KL_LEVEL_IMMEDIATE: RewardKlLevel
MISMATCH_LEVEL_UNSPECIFIED: MismatchLevel
MISMATCH_LEVEL_TOKEN: MismatchLevel
MISMATCH_LEVEL_SEQUENCE: MismatchLevel
MISMATCH_LEVEL_GEOMETRIC: MismatchLevel
MISMATCH_MODE_UNSPECIFIED: MismatchMode
MISMATCH_MODE_TRUNCATE: MismatchMode
MISMATCH_MODE_MASK: MismatchMode
MISMATCH_MODE_SEQ_MASK: MismatchMode
REJECTION_STATISTIC_UNSPECIFIED: RejectionStatistic
REJECTION_STATISTIC_K1: RejectionStatistic
REJECTION_STATISTIC_K2: RejectionStatistic
REJECTION_STATISTIC_K3: RejectionStatistic
REJECTION_STATISTIC_BINARY_KL: RejectionStatistic
REJECTION_STATISTIC_K3_REVERSE: RejectionStatistic
REJECTION_LEVEL_UNSPECIFIED: RejectionLevel
REJECTION_LEVEL_TOKEN: RejectionLevel
REJECTION_LEVEL_SEQ_SUM: RejectionLevel
REJECTION_LEVEL_SEQ_MEAN: RejectionLevel
REJECTION_LEVEL_SEQ_MAX: RejectionLevel
REJECTION_LEVEL_SEQ_MIN: RejectionLevel
OFF_POLICY_MASK_REFERENCE_UNSPECIFIED: OffPolicyMaskReference
OFF_POLICY_MASK_REFERENCE_ROLLOUT: OffPolicyMaskReference
OFF_POLICY_MASK_REFERENCE_OLD: OffPolicyMaskReference

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "padding")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    PADDING_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    padding: bytes
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., padding: _Optional[bytes] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("logp", "offsets", "old_logp", "mask", "ref_logp", "rollout_logp", "rewards", "group_ids", "advantages", "advantage_level", "sum_pi_squared")
    LOGP_FIELD_NUMBER: _ClassVar[int]
    OFFSETS_FIELD_NUMBER: _ClassVar[int]
    OLD_LOGP_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    REF_LOGP_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_LOGP_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    SUM_PI_SQUARED_FIELD_NUMBER: _ClassVar[int]
    logp: Tensor
    offsets: Tensor
    old_logp: Tensor
    mask: Tensor
    ref_logp: Tensor
    rollout_logp: Tensor
    rewards: Tensor
    group_ids: Tensor
    advantages: Tensor
    advantage_level: AdvantageLevel
    sum_pi_squared: Tensor
    def __init__(self, logp: _Optional[_Union[Tensor, _Mapping]] = ..., offsets: _Optional[_Union[Tensor, _Mapping]] = ..., old_logp: _Optional[_Union[Tensor, _Mapping]] = ..., mask: _Optional[_Union[Tensor, _Mapping]] = ..., ref_logp: _Optional[_Union[Tensor, _Mapping]] = ..., rollout_logp: _Optional[_Union[Tensor, _Mapping]] = ..., rewards: _Optional[_Union[Tensor, _Mapping]] = ..., group_ids: _Optional[_Union[Tensor, _Mapping]] = ..., advantages: _Optional[_Union[Tensor, _Mapping]] = ..., advantage_level: _Optional[_Union[AdvantageLevel, str]] = ..., sum_pi_squared: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class SapoParams(_message.Message):
    __slots__ = ("tau_pos", "tau_neg")
    TAU_POS_FIELD_NUMBER: _ClassVar[int]
    TAU_NEG_FIELD_NUMBER: _ClassVar[int]
    tau_pos: float
    tau_neg: float
    def __init__(self, tau_pos: _Optional[float] = ..., tau_neg: _Optional[float] = ...) -> None: ...

class SapoSeqParams(_message.Message):
    __slots__ = ("tau_pos", "tau_neg")
    TAU_POS_FIELD_NUMBER: _ClassVar[int]
    TAU_NEG_FIELD_NUMBER: _ClassVar[int]
    tau_pos: float
    tau_neg: float
    def __init__(self, tau_pos: _Optional[float] = ..., tau_neg: _Optional[float] = ...) -> None: ...

class GrpoParams(_message.Message):
    __slots__ = ("eps_low", "eps_high", "dual_clip")
    EPS_LOW_FIELD_NUMBER: _ClassVar[int]
    EPS_HIGH_FIELD_NUMBER: _ClassVar[int]
    DUAL_CLIP_FIELD_NUMBER: _ClassVar[int]
    eps_low: float
    eps_high: float
    dual_clip: float
    def __init__(self, eps_low: _Optional[float] = ..., eps_high: _Optional[float] = ..., dual_clip: _Optional[float] = ...) -> None: ...

class GspoParams(_message.Message):
    __slots__ = ("eps_low", "eps_high", "dual_clip")
    EPS_LOW_FIELD_NUMBER: _ClassVar[int]
    EPS_HIGH_FIELD_NUMBER: _ClassVar[int]
    DUAL_CLIP_FIELD_NUMBER: _ClassVar[int]
    eps_low: float
    eps_high: float
    dual_clip: float
    def __init__(self, eps_low: _Optional[float] = ..., eps_high: _Optional[float] = ..., dual_clip: _Optional[float] = ...) -> None: ...

class GspoTokenParams(_message.Message):
    __slots__ = ("eps_low", "eps_high")
    EPS_LOW_FIELD_NUMBER: _ClassVar[int]
    EPS_HIGH_FIELD_NUMBER: _ClassVar[int]
    eps_low: float
    eps_high: float
    def __init__(self, eps_low: _Optional[float] = ..., eps_high: _Optional[float] = ...) -> None: ...

class CispoParams(_message.Message):
    __slots__ = ("eps_low", "eps_high")
    EPS_LOW_FIELD_NUMBER: _ClassVar[int]
    EPS_HIGH_FIELD_NUMBER: _ClassVar[int]
    eps_low: float
    eps_high: float
    def __init__(self, eps_low: _Optional[float] = ..., eps_high: _Optional[float] = ...) -> None: ...

class CispoSeqParams(_message.Message):
    __slots__ = ("eps_low", "eps_high")
    EPS_LOW_FIELD_NUMBER: _ClassVar[int]
    EPS_HIGH_FIELD_NUMBER: _ClassVar[int]
    eps_low: float
    eps_high: float
    def __init__(self, eps_low: _Optional[float] = ..., eps_high: _Optional[float] = ...) -> None: ...

class GppoParams(_message.Message):
    __slots__ = ("eps_low", "eps_high")
    EPS_LOW_FIELD_NUMBER: _ClassVar[int]
    EPS_HIGH_FIELD_NUMBER: _ClassVar[int]
    eps_low: float
    eps_high: float
    def __init__(self, eps_low: _Optional[float] = ..., eps_high: _Optional[float] = ...) -> None: ...

class GmpoParams(_message.Message):
    __slots__ = ("eps_low", "eps_high")
    EPS_LOW_FIELD_NUMBER: _ClassVar[int]
    EPS_HIGH_FIELD_NUMBER: _ClassVar[int]
    eps_low: float
    eps_high: float
    def __init__(self, eps_low: _Optional[float] = ..., eps_high: _Optional[float] = ...) -> None: ...

class DppoTvParams(_message.Message):
    __slots__ = ("eps_low", "eps_high", "ratio_cap")
    EPS_LOW_FIELD_NUMBER: _ClassVar[int]
    EPS_HIGH_FIELD_NUMBER: _ClassVar[int]
    RATIO_CAP_FIELD_NUMBER: _ClassVar[int]
    eps_low: float
    eps_high: float
    ratio_cap: float
    def __init__(self, eps_low: _Optional[float] = ..., eps_high: _Optional[float] = ..., ratio_cap: _Optional[float] = ...) -> None: ...

class DppoKlParams(_message.Message):
    __slots__ = ("eps_low", "eps_high", "ratio_cap")
    EPS_LOW_FIELD_NUMBER: _ClassVar[int]
    EPS_HIGH_FIELD_NUMBER: _ClassVar[int]
    RATIO_CAP_FIELD_NUMBER: _ClassVar[int]
    eps_low: float
    eps_high: float
    ratio_cap: float
    def __init__(self, eps_low: _Optional[float] = ..., eps_high: _Optional[float] = ..., ratio_cap: _Optional[float] = ...) -> None: ...

class ClipCovParams(_message.Message):
    __slots__ = ("eps_low", "eps_high", "fraction", "cov_low", "cov_high", "seed")
    EPS_LOW_FIELD_NUMBER: _ClassVar[int]
    EPS_HIGH_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    COV_LOW_FIELD_NUMBER: _ClassVar[int]
    COV_HIGH_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    eps_low: float
    eps_high: float
    fraction: float
    cov_low: float
    cov_high: float
    seed: int
    def __init__(self, eps_low: _Optional[float] = ..., eps_high: _Optional[float] = ..., fraction: _Optional[float] = ..., cov_low: _Optional[float] = ..., cov_high: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class KlCovParams(_message.Message):
    __slots__ = ("fraction", "coef")
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    COEF_FIELD_NUMBER: _ClassVar[int]
    fraction: float
    coef: float
    def __init__(self, fraction: _Optional[float] = ..., coef: _Optional[float] = ...) -> None: ...

class ReinforceParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DroParams(_message.Message):
    __slots__ = ("coef",)
    COEF_FIELD_NUMBER: _ClassVar[int]
    coef: float
    def __init__(self, coef: _Optional[float] = ...) -> None: ...

class Objective(_message.Message):
    __slots__ = ("sapo", "grpo", "gspo", "gspo_token", "cispo", "gppo", "gmpo", "dppo_tv", "dppo_kl", "clip_cov", "kl_cov", "reinforce", "sapo_seq", "cispo_seq", "dro")
    SAPO_FIELD_NUMBER: _ClassVar[int]
    GRPO_FIELD_NUMBER: _ClassVar[int]
    GSPO_FIELD_NUMBER: _ClassVar[int]
    GSPO_TOKEN_FIELD_NUMBER: _ClassVar[int]
    CISPO_FIELD_NUMBER: _ClassVar[int]
    GPPO_FIELD_NUMBER: _ClassVar[int]
    GMPO_FIELD_NUMBER: _ClassVar[int]
    DPPO_TV_FIELD_NUMBER: _ClassVar[int]
    DPPO_KL_FIELD_NUMBER: _ClassVar[int]
    CLIP_COV_FIELD_NUMBER: _ClassVar[int]
    KL_COV_FIELD_NUMBER: _ClassVar[int]
    REINFORCE_FIELD_NUMBER: _ClassVar[int]
    SAPO_SEQ_FIELD_NUMBER: _ClassVar[int]
    CISPO_SEQ_FIELD_NUMBER: _ClassVar[int]
    DRO_FIELD_NUMBER: _ClassVar[int]
    sapo: SapoParams
    grpo: GrpoParams
    gspo: GspoParams
    gspo_token: GspoTokenParams
    cispo: CispoParams
    gppo: GppoParams
    gmpo: GmpoParams
    dppo_tv: DppoTvParams
    dppo_kl: DppoKlParams
    clip_cov: ClipCovParams
    kl_cov: KlCovParams
    reinforce: ReinforceParams
    sapo_seq: SapoSeqParams
    cispo_seq: CispoSeqParams
    dro: DroParams
    def __init__(self, sapo: _Optional[_Union[SapoParams, _Mapping]] = ..., grpo: _Optional[_Union[GrpoParams, _Mapping]] = ..., gspo: _Optional[_Union[GspoParams, _Mapping]] = ..., gspo_token: _Optional[_Union[GspoTokenParams, _Mapping]] = ..., cispo: _Optional[_Union[CispoParams, _Mapping]] = ..., gppo: _Optional[_Union[GppoParams, _Mapping]] = ..., gmpo: _Optional[_Union[GmpoParams, _Mapping]] = ..., dppo_tv: _Optional[_Union[DppoTvParams, _Mapping]] = ..., dppo_kl: _Optional[_Union[DppoKlParams, _Mapping]] = ..., clip_cov: _Optional[_Union[ClipCovParams, _Mapping]] = ..., kl_cov: _Optional[_Union[KlCovParams, _Mapping]] = ..., reinforce: _Optional[_Union[ReinforceParams, _Mapping]] = ..., sapo_seq: _Optional[_Union[SapoSeqParams, _Mapping]] = ..., cispo_seq: _Optional[_Union[CispoSeqParams, _Mapping]] = ..., dro: _Optional[_Union[DroParams, _Mapping]] = ...) -> None: ...

class AdvantageConfig(_message.Message):
    __slots__ = ("estimator", "scale", "eps", "min_group_std", "reward_weights", "gamma", "skip_nan_components", "position", "zero_tail")
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MIN_GROUP_STD_FIELD_NUMBER: _ClassVar[int]
    REWARD_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    GAMMA_FIELD_NUMBER: _ClassVar[int]
    SKIP_NAN_COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ZERO_TAIL_FIELD_NUMBER: _ClassVar[int]
    estimator: AdvantageEstimator
    scale: AdvantageScale
    eps: float
    min_group_std: float
    reward_weights: _containers.RepeatedScalarFieldContainer[float]
    gamma: float
    skip_nan_components: bool
    position: TokenPosition
    zero_tail: bool
    def __init__(self, estimator: _Optional[_Union[AdvantageEstimator, str]] = ..., scale: _Optional[_Union[AdvantageScale, str]] = ..., eps: _Optional[float] = ..., min_group_std: _Optional[float] = ..., reward_weights: _Optional[_Iterable[float]] = ..., gamma: _Optional[float] = ..., skip_nan_components: bool = ..., position: _Optional[_Union[TokenPosition, str]] = ..., zero_tail: bool = ...) -> None: ...

class AggregationConfig(_message.Message):
    __slots__ = ("mode", "num_tokens", "num_seqs", "constant")
    MODE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    mode: AggregationMode
    num_tokens: float
    num_seqs: float
    constant: float
    def __init__(self, mode: _Optional[_Union[AggregationMode, str]] = ..., num_tokens: _Optional[float] = ..., num_seqs: _Optional[float] = ..., constant: _Optional[float] = ...) -> None: ...

class KlConfig(_message.Message):
    __slots__ = ("estimator", "beta", "aggregation", "value_clamp", "weight")
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    BETA_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    VALUE_CLAMP_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    estimator: KlEstimator
    beta: float
    aggregation: AggregationMode
    value_clamp: float
    weight: KlWeight
    def __init__(self, estimator: _Optional[_Union[KlEstimator, str]] = ..., beta: _Optional[float] = ..., aggregation: _Optional[_Union[AggregationMode, str]] = ..., value_clamp: _Optional[float] = ..., weight: _Optional[_Union[KlWeight, str]] = ...) -> None: ...

class RewardKlConfig(_message.Message):
    __slots__ = ("beta", "estimator", "level", "value_clamp")
    BETA_FIELD_NUMBER: _ClassVar[int]
    ESTIMATOR_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    VALUE_CLAMP_FIELD_NUMBER: _ClassVar[int]
    beta: float
    estimator: KlEstimator
    level: RewardKlLevel
    value_clamp: float
    def __init__(self, beta: _Optional[float] = ..., estimator: _Optional[_Union[KlEstimator, str]] = ..., level: _Optional[_Union[RewardKlLevel, str]] = ..., value_clamp: _Optional[float] = ...) -> None: ...

class MismatchConfig(_message.Message):
    __slots__ = ("level", "mode", "cap", "lo", "hi", "floor", "batch_normalize")
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CAP_FIELD_NUMBER: _ClassVar[int]
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    FLOOR_FIELD_NUMBER: _ClassVar[int]
    BATCH_NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    level: MismatchLevel
    mode: MismatchMode
    cap: float
    lo: float
    hi: float
    floor: float
    batch_normalize: bool
    def __init__(self, level: _Optional[_Union[MismatchLevel, str]] = ..., mode: _Optional[_Union[MismatchMode, str]] = ..., cap: _Optional[float] = ..., lo: _Optional[float] = ..., hi: _Optional[float] = ..., floor: _Optional[float] = ..., batch_normalize: bool = ...) -> None: ...

class RejectionCriterion(_message.Message):
    __slots__ = ("statistic", "level", "upper", "lower")
    STATISTIC_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    UPPER_FIELD_NUMBER: _ClassVar[int]
    LOWER_FIELD_NUMBER: _ClassVar[int]
    statistic: RejectionStatistic
    level: RejectionLevel
    upper: float
    lower: float
    def __init__(self, statistic: _Optional[_Union[RejectionStatistic, str]] = ..., level: _Optional[_Union[RejectionLevel, str]] = ..., upper: _Optional[float] = ..., lower: _Optional[float] = ...) -> None: ...

class LossConfig(_message.Message):
    __slots__ = ("objective", "advantages", "aggregation", "kl", "mismatch", "log_ratio_clamp", "saturation_threshold", "off_policy_mask_threshold", "rejection", "reward_kl", "off_policy_mask_reference")
    OBJECTIVE_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATION_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_FIELD_NUMBER: _ClassVar[int]
    LOG_RATIO_CLAMP_FIELD_NUMBER: _ClassVar[int]
    SATURATION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    OFF_POLICY_MASK_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REJECTION_FIELD_NUMBER: _ClassVar[int]
    REWARD_KL_FIELD_NUMBER: _ClassVar[int]
    OFF_POLICY_MASK_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    objective: Objective
    advantages: AdvantageConfig
    aggregation: AggregationConfig
    kl: KlConfig
    mismatch: MismatchConfig
    log_ratio_clamp: float
    saturation_threshold: float
    off_policy_mask_threshold: float
    rejection: _containers.RepeatedCompositeFieldContainer[RejectionCriterion]
    reward_kl: RewardKlConfig
    off_policy_mask_reference: OffPolicyMaskReference
    def __init__(self, objective: _Optional[_Union[Objective, _Mapping]] = ..., advantages: _Optional[_Union[AdvantageConfig, _Mapping]] = ..., aggregation: _Optional[_Union[AggregationConfig, _Mapping]] = ..., kl: _Optional[_Union[KlConfig, _Mapping]] = ..., mismatch: _Optional[_Union[MismatchConfig, _Mapping]] = ..., log_ratio_clamp: _Optional[float] = ..., saturation_threshold: _Optional[float] = ..., off_policy_mask_threshold: _Optional[float] = ..., rejection: _Optional[_Iterable[_Union[RejectionCriterion, _Mapping]]] = ..., reward_kl: _Optional[_Union[RewardKlConfig, _Mapping]] = ..., off_policy_mask_reference: _Optional[_Union[OffPolicyMaskReference, str]] = ...) -> None: ...

class OutputSelection(_message.Message):
    __slots__ = ("gradient", "advantages", "ratio", "gate_weight", "clip_mask", "mask")
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    GATE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLIP_MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    gradient: bool
    advantages: bool
    ratio: bool
    gate_weight: bool
    clip_mask: bool
    mask: bool
    def __init__(self, gradient: bool = ..., advantages: bool = ..., ratio: bool = ..., gate_weight: bool = ..., clip_mask: bool = ..., mask: bool = ...) -> None: ...

class TokenOutputs(_message.Message):
    __slots__ = ("gradient", "advantages", "ratio", "gate_weight", "clip_mask", "mask")
    GRADIENT_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    GATE_WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CLIP_MASK_FIELD_NUMBER: _ClassVar[int]
    MASK_FIELD_NUMBER: _ClassVar[int]
    gradient: Tensor
    advantages: Tensor
    ratio: Tensor
    gate_weight: Tensor
    clip_mask: Tensor
    mask: Tensor
    def __init__(self, gradient: _Optional[_Union[Tensor, _Mapping]] = ..., advantages: _Optional[_Union[Tensor, _Mapping]] = ..., ratio: _Optional[_Union[Tensor, _Mapping]] = ..., gate_weight: _Optional[_Union[Tensor, _Mapping]] = ..., clip_mask: _Optional[_Union[Tensor, _Mapping]] = ..., mask: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ComputeAdvantagesRequest(_message.Message):
    __slots__ = ("config", "rewards", "group_ids", "token_counts")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    REWARDS_FIELD_NUMBER: _ClassVar[int]
    GROUP_IDS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_COUNTS_FIELD_NUMBER: _ClassVar[int]
    config: AdvantageConfig
    rewards: Tensor
    group_ids: Tensor
    token_counts: Tensor
    def __init__(self, config: _Optional[_Union[AdvantageConfig, _Mapping]] = ..., rewards: _Optional[_Union[Tensor, _Mapping]] = ..., group_ids: _Optional[_Union[Tensor, _Mapping]] = ..., token_counts: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ComputeAdvantagesResponse(_message.Message):
    __slots__ = ("advantages", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    advantages: Tensor
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, advantages: _Optional[_Union[Tensor, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ComputeLossRequest(_message.Message):
    __slots__ = ("config", "batch", "outputs")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    config: LossConfig
    batch: Batch
    outputs: OutputSelection
    def __init__(self, config: _Optional[_Union[LossConfig, _Mapping]] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., outputs: _Optional[_Union[OutputSelection, _Mapping]] = ...) -> None: ...

class ComputeLossResponse(_message.Message):
    __slots__ = ("loss", "policy_loss", "kl_loss", "metrics", "outputs")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    POLICY_LOSS_FIELD_NUMBER: _ClassVar[int]
    KL_LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    policy_loss: float
    kl_loss: float
    metrics: _containers.ScalarMap[str, float]
    outputs: TokenOutputs
    def __init__(self, loss: _Optional[float] = ..., policy_loss: _Optional[float] = ..., kl_loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., outputs: _Optional[_Union[TokenOutputs, _Mapping]] = ...) -> None: ...

class StreamLossRequest(_message.Message):
    __slots__ = ("config", "outputs", "chunk")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    config: LossConfig
    outputs: OutputSelection
    chunk: Batch
    def __init__(self, config: _Optional[_Union[LossConfig, _Mapping]] = ..., outputs: _Optional[_Union[OutputSelection, _Mapping]] = ..., chunk: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class LossSummary(_message.Message):
    __slots__ = ("loss", "policy_loss", "kl_loss", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    POLICY_LOSS_FIELD_NUMBER: _ClassVar[int]
    KL_LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    loss: float
    policy_loss: float
    kl_loss: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, loss: _Optional[float] = ..., policy_loss: _Optional[float] = ..., kl_loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class StreamLossResponse(_message.Message):
    __slots__ = ("chunk_index", "token_start", "sequence_start", "outputs", "summary")
    CHUNK_INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_START_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_START_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    chunk_index: int
    token_start: int
    sequence_start: int
    outputs: TokenOutputs
    summary: LossSummary
    def __init__(self, chunk_index: _Optional[int] = ..., token_start: _Optional[int] = ..., sequence_start: _Optional[int] = ..., outputs: _Optional[_Union[TokenOutputs, _Mapping]] = ..., summary: _Optional[_Union[LossSummary, _Mapping]] = ...) -> None: ...

class ListAlgorithmsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ParameterInfo(_message.Message):
    __slots__ = ("name", "description", "default_value", "choices", "default_choice")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_VALUE_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CHOICE_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    default_value: float
    choices: _containers.RepeatedScalarFieldContainer[str]
    default_choice: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., default_value: _Optional[float] = ..., choices: _Optional[_Iterable[str]] = ..., default_choice: _Optional[str] = ...) -> None: ...

class AlgorithmInfo(_message.Message):
    __slots__ = ("name", "description", "parameters")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    parameters: _containers.RepeatedCompositeFieldContainer[ParameterInfo]
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., parameters: _Optional[_Iterable[_Union[ParameterInfo, _Mapping]]] = ...) -> None: ...

class MetricInfo(_message.Message):
    __slots__ = ("name", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_tokens", "max_sequences", "max_groups", "max_message_bytes", "max_stream_chunks")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    MAX_GROUPS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_STREAM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    max_sequences: int
    max_groups: int
    max_message_bytes: int
    max_stream_chunks: int
    def __init__(self, max_tokens: _Optional[int] = ..., max_sequences: _Optional[int] = ..., max_groups: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_stream_chunks: _Optional[int] = ...) -> None: ...

class ListAlgorithmsResponse(_message.Message):
    __slots__ = ("objectives", "advantage_estimators", "aggregations", "kl_estimators", "mismatch_modes", "loss_parameters", "metrics", "limits", "server_version", "rejection_statistics", "reward_kl_estimators")
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGE_ESTIMATORS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATIONS_FIELD_NUMBER: _ClassVar[int]
    KL_ESTIMATORS_FIELD_NUMBER: _ClassVar[int]
    MISMATCH_MODES_FIELD_NUMBER: _ClassVar[int]
    LOSS_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    REJECTION_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    REWARD_KL_ESTIMATORS_FIELD_NUMBER: _ClassVar[int]
    objectives: _containers.RepeatedCompositeFieldContainer[AlgorithmInfo]
    advantage_estimators: _containers.RepeatedCompositeFieldContainer[AlgorithmInfo]
    aggregations: _containers.RepeatedCompositeFieldContainer[AlgorithmInfo]
    kl_estimators: _containers.RepeatedCompositeFieldContainer[AlgorithmInfo]
    mismatch_modes: _containers.RepeatedCompositeFieldContainer[AlgorithmInfo]
    loss_parameters: _containers.RepeatedCompositeFieldContainer[ParameterInfo]
    metrics: _containers.RepeatedCompositeFieldContainer[MetricInfo]
    limits: ServerLimits
    server_version: str
    rejection_statistics: _containers.RepeatedCompositeFieldContainer[AlgorithmInfo]
    reward_kl_estimators: _containers.RepeatedCompositeFieldContainer[AlgorithmInfo]
    def __init__(self, objectives: _Optional[_Iterable[_Union[AlgorithmInfo, _Mapping]]] = ..., advantage_estimators: _Optional[_Iterable[_Union[AlgorithmInfo, _Mapping]]] = ..., aggregations: _Optional[_Iterable[_Union[AlgorithmInfo, _Mapping]]] = ..., kl_estimators: _Optional[_Iterable[_Union[AlgorithmInfo, _Mapping]]] = ..., mismatch_modes: _Optional[_Iterable[_Union[AlgorithmInfo, _Mapping]]] = ..., loss_parameters: _Optional[_Iterable[_Union[ParameterInfo, _Mapping]]] = ..., metrics: _Optional[_Iterable[_Union[MetricInfo, _Mapping]]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., server_version: _Optional[str] = ..., rejection_statistics: _Optional[_Iterable[_Union[AlgorithmInfo, _Mapping]]] = ..., reward_kl_estimators: _Optional[_Iterable[_Union[AlgorithmInfo, _Mapping]]] = ...) -> None: ...
