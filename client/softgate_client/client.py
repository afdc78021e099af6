"""SoftgateClient: numpy / torch batches in, loss + exact per-token gradient + metrics out.

    from softgate_client import SoftgateClient

    with SoftgateClient("localhost:50051", run="llama-8b-sapo") as sg:
        r = sg.loss(logp, old_logp, mask=mask, rewards=rewards, group_ids=group_ids,
                    objective="sapo", tau_pos=1.0, tau_neg=1.05)
        r.loss, r.grad, r.metrics["clip_high"]

Arrays travel as raw little-endian bytes (one memcpy per array). Padded [B, T] inputs are
packed to the service's ragged layout (each row up to its last mask = 1) and the per-token
outputs are padded back to [B, T]. Calls whose request or response is larger than
`stream_threshold_bytes` go over the StreamLoss RPC, split on sequence boundaries; its results
equal the unary ones bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
import numpy as np

from softgate_client import _wire
from softgate_client import config as cfg
from softgate_client._channel import DEFAULT_MAX_MESSAGE_BYTES, RetryPolicy, make_channel, uses_tls
from softgate_client._fork import in_flight, keep_inherited, rebuild_lock
from softgate_client._retry import call_with_retries
from softgate_client._tensors import (
    ArrayInputError,
    Layout,
    float_array,
    from_le_bytes,
    int_array,
    is_half,
    is_torch,
    le_bytes,
    make_layout,
    to_numpy,
)
from softgate_client.errors import (
    DeadlineExceededError,
    FieldViolation,
    InternalError,
    InvalidArgumentError,
    ResourceExhaustedError,
    UnavailableError,
    invalid_argument,
)
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb
from softgate_client.proto.softgate.v1 import softgate_pb2_grpc as pb_grpc

RUN_METADATA_KEY = "softgate-run"
_RUN_BAD = re.compile(r"[^A-Za-z0-9_.:/-]")  # what the server makes `_` of (its runs.py)
MAX_RUN_NAME = 64  # the server's cut (its runs.py); a longer value only risks gRPC's metadata limit
SERVICE = "softgate.v1.LossService"
DEFAULT_TIMEOUT = 300.0
# a timeout over this (3 years) is no deadline: gRPC takes math.inf or 1e12 s as already expired
_NO_DEADLINE_S = 1e8
DEFAULT_CHUNK_BYTES = 16 * 1024 * 1024  # bench/RESULTS.md "End-to-end": the chunk sweep
# a chunk's headers: 48 bytes for each of at most 9 tensors (tag, length, dtype, shape, data
# tag and length, alignment padding; the offsets' extra element); the config in the first
# message fits in the 10% left under the message limit
_CHUNK_HEAD_BYTES = 48 * len(_wire.BATCH_FIELDS)
# the smallest limit a server may be set to: a call whose request could be over 90% of it (its
# data, plus headers) asks the server's own limit first (once), as the threshold keeps 10% free
_LIMIT_PROBE_BYTES = 64 * 1024
_LIMIT_PROBE_ABOVE = int(0.9 * _LIMIT_PROBE_BYTES) - _CHUNK_HEAD_BYTES
# this client's channel refusing a message (gRPC's words): its limit is the number after "vs."
_OWN_LIMIT = re.compile(r"CLIENT: \w+ message larger than max \(\d+ vs\. (\d+)\)")
_LIMIT_PROBE_S = 10.0  # the longest the ask of the server's limit waits (within the call's timeout)
T = TypeVar("T")

_NP_TO_DTYPE: dict[np.dtype, int] = {
    np.dtype(np.float32): pb.DTYPE_FLOAT32,
    np.dtype(np.float64): pb.DTYPE_FLOAT64,
    np.dtype(np.int64): pb.DTYPE_INT64,
    np.dtype(np.int32): pb.DTYPE_INT32,
    np.dtype(np.bool_): pb.DTYPE_BOOL,
    np.dtype(np.uint8): pb.DTYPE_UINT8,
    np.dtype(np.int8): pb.DTYPE_INT8,
    np.dtype(np.int16): pb.DTYPE_INT16,
    np.dtype(np.float16): pb.DTYPE_FLOAT16,
}
_DTYPE_TO_NP: dict[int, np.dtype] = {v: k for k, v in _NP_TO_DTYPE.items()}
_TOKEN_OUTPUTS = ("gradient", *cfg.OUTPUTS)


# ---------------------------------------------------------------- results


@dataclass
class LossResult:
    """What one loss call returned. Per-token arrays have the caller's layout: [B, T] for a
    padded batch (0 / False outside the sent tokens), [N] for a ragged one; they are read-only
    (often views of the response's bytes): scale a copy, `r.grad * s`. Outputs that were not
    asked for (`outputs=`) are None."""

    loss: float
    policy_loss: float
    kl_loss: float
    grad: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)
    advantages: np.ndarray | None = None
    ratio: np.ndarray | None = None
    gate_weight: np.ndarray | None = None
    clip_mask: np.ndarray | None = None
    mask: np.ndarray | None = None
    offsets: np.ndarray | None = None  # the ragged layout the batch travelled in
    streamed: bool = False  # True when the call went over StreamLoss
    chunks: int = 1


@dataclass
class AdvantagesResult:
    advantages: np.ndarray  # [B]
    metrics: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------- tensors and config to proto


@functools.lru_cache(maxsize=64)
def _run_label(run: str) -> str:
    """The run name as the server labels it (other characters become `_`, cut at 64): gRPC
    refuses metadata values that are not printable ASCII before they leave the client, and
    ones over 16 KiB at the server."""
    return _RUN_BAD.sub("_", run.strip())[:MAX_RUN_NAME]


def _seconds(value: Any, name: str, also: str) -> float:
    """`value` as a number of seconds >= 0 (math.inf too); else ValueError naming `name`,
    `also` saying what else it may be."""
    try:
        t = float(value)
    except (TypeError, ValueError):
        t = math.nan
    if not t >= 0:
        raise ValueError(f"{name}: {value!r} must be a number of seconds >= 0{also}")
    return t


def _count(value: Any, name: str, most: int | None = None, also: str = "") -> int:
    """`value` as an integer >= 1 (and <= `most`); else ValueError naming `name`, `also` saying
    what else it may be. A bool is not a count (True would be 1)."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok or value < 1 or (most is not None and value > most):
        bound = ">= 1" if most is None else f"in [1, {most}]"
        raise ValueError(f"{name}: {value!r} must be an integer {bound}{also}")
    return int(value)


def _check_run(run: Any) -> None:
    """A run name is a str or None; else ValueError naming `run` (an int failed inside, later)."""
    if run is not None and not isinstance(run, str):
        raise ValueError(f"run: {run!r} must be a str (the run's name) or None")


def timeout_seconds(timeout: float | None) -> float | None:
    """`timeout` as the client uses it: None for no deadline (math.inf, or over 1e8 s, which
    gRPC would take as already expired); NaN or negative: ValueError naming it."""
    if timeout is None:
        return None
    t = _seconds(timeout, "timeout", ", or None / math.inf (no deadline)")
    return None if t > _NO_DEADLINE_S else t


def _left(deadline: float | None) -> float | None:
    """The seconds left until `deadline` (time.monotonic), never below 0; None: no deadline."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


def _fill(t: pb.Tensor, a: np.ndarray) -> pb.Tensor:
    """Fill the Tensor field `t` in place (one copy of the data into the message)."""
    dt = _NP_TO_DTYPE.get(a.dtype.newbyteorder("="))
    if dt is None:
        raise TypeError(f"unsupported dtype {a.dtype}")
    t.dtype = dt  # type: ignore[assignment]
    t.shape.extend(int(d) for d in a.shape)  # ([B], or rewards [B, K])
    t.data = le_bytes(a)
    return t


def _array(t: pb.Tensor) -> np.ndarray:
    dt = _DTYPE_TO_NP.get(t.dtype)
    if dt is None:
        raise ValueError(f"unexpected dtype {pb.Dtype.Name(t.dtype)} in a response")
    return from_le_bytes(t.data, dt)


# a KL in the reward takes these of KlEstimator (RewardKLConfig)
REWARD_KL_CHOICES = ["k1", "k2", "k3", "abs"]


def _enum(enum: Any, prefix: str, value: str | None, field_name: str, shown: list[str] | None = None) -> int:
    """`value`'s number in `enum`; an unknown name refused, listing `shown` (None: every value)."""
    if value is None:
        return 0
    name = f"{prefix}_{str(value).upper()}"
    try:
        return int(enum.Value(name))
    except ValueError:
        choices = shown or [
            n[len(prefix) + 1 :].lower()
            for n in enum.DESCRIPTOR.values_by_name
            if not n.endswith("UNSPECIFIED")
        ]
        raise invalid_argument(field_name, f"unknown_choice: {value!r}; one of {choices}") from None


def _set_optional(msg: Any, **values: float | None) -> None:
    for k, v in values.items():
        if v is not None:
            setattr(msg, k, v if k in cfg.INTEGER_PARAMS else float(v))


def loss_config_to_proto(c: cfg.LossConfig) -> pb.LossConfig:
    """The proto LossConfig of a client LossConfig (unset fields stay unset: server defaults)."""
    out = pb.LossConfig()
    obj = getattr(out.objective, c.objective.name)
    obj.SetInParent()
    _set_optional(obj, **c.objective.params)
    a = c.advantages
    if (
        a.skip_nan_components
        or a.zero_tail
        or any(
            v is not None
            for v in (a.estimator, a.scale, a.eps, a.min_group_std, a.reward_weights, a.gamma, a.position)
        )
    ):
        adv: Any = out.advantages
        adv.estimator = _enum(
            pb.AdvantageEstimator, "ADVANTAGE_ESTIMATOR", a.estimator, "config.advantages.estimator"
        )
        adv.scale = _enum(pb.AdvantageScale, "ADVANTAGE_SCALE", a.scale, "config.advantages.scale")
        _set_optional(adv, eps=a.eps, min_group_std=a.min_group_std, gamma=a.gamma)
        if a.reward_weights is not None:
            adv.reward_weights.extend(a.reward_weights)
        adv.skip_nan_components = a.skip_nan_components
        adv.position = _enum(pb.TokenPosition, "TOKEN_POSITION", a.position, "config.advantages.position")
        adv.zero_tail = a.zero_tail
    g = c.aggregation
    if any(v is not None for v in (g.mode, g.num_tokens, g.num_seqs, g.constant)):
        agg: Any = out.aggregation
        agg.mode = _enum(pb.AggregationMode, "AGGREGATION_MODE", g.mode, "config.aggregation.mode")
        _set_optional(agg, num_tokens=g.num_tokens, num_seqs=g.num_seqs, constant=g.constant)
    if c.kl is not None:
        kl: Any = out.kl
        kl.SetInParent()
        kl.estimator = _enum(pb.KlEstimator, "KL_ESTIMATOR", c.kl.estimator, "config.kl.estimator")
        kl.aggregation = _enum(
            pb.AggregationMode, "AGGREGATION_MODE", c.kl.aggregation, "config.kl.aggregation"
        )
        weight = _enum(pb.KlWeight, "KL_WEIGHT", c.kl.weight, "config.kl.weight")
        kl.weight = (
            0 if weight == pb.KL_WEIGHT_NONE else weight
        )  # (the default: a server before it accepts it)
        _set_optional(kl, beta=c.kl.beta, value_clamp=c.kl.value_clamp)
    if c.mismatch is not None:
        m = c.mismatch
        mm: Any = out.mismatch
        mm.SetInParent()
        mm.level = _enum(pb.MismatchLevel, "MISMATCH_LEVEL", m.level, "config.mismatch.level")
        mm.mode = _enum(pb.MismatchMode, "MISMATCH_MODE", m.mode, "config.mismatch.mode")
        _set_optional(mm, cap=m.cap, lo=m.lo, hi=m.hi, floor=m.floor)
        mm.batch_normalize = m.batch_normalize
    if c.reward_kl is not None:
        rk: Any = out.reward_kl
        rk.SetInParent()
        rk.estimator = _enum(  # (the loss term's estimators are the server's to refuse, by reason)
            pb.KlEstimator,
            "KL_ESTIMATOR",
            c.reward_kl.estimator,
            "config.reward_kl.estimator",
            REWARD_KL_CHOICES,
        )
        rk.level = _enum(pb.RewardKlLevel, "REWARD_KL_LEVEL", c.reward_kl.level, "config.reward_kl.level")
        _set_optional(rk, beta=c.reward_kl.beta, value_clamp=c.reward_kl.value_clamp)
    for i, r in enumerate(c.rejection):
        rc: Any = out.rejection.add()
        rc.statistic = _enum(
            pb.RejectionStatistic, "REJECTION_STATISTIC", r.statistic, f"config.rejection[{i}].statistic"
        )
        rc.level = _enum(pb.RejectionLevel, "REJECTION_LEVEL", r.level, f"config.rejection[{i}].level")
        _set_optional(rc, upper=r.upper, lower=r.lower)
    _set_optional(
        out,
        log_ratio_clamp=c.log_ratio_clamp,
        saturation_threshold=c.saturation_threshold,
        off_policy_mask_threshold=c.off_policy_mask_threshold,
    )
    ref = _enum(
        pb.OffPolicyMaskReference,
        "OFF_POLICY_MASK_REFERENCE",
        c.off_policy_mask_reference,
        "config.off_policy_mask_reference",
    )
    # the default is sent unset: a server from before the field refuses any value of it
    out.off_policy_mask_reference = 0 if ref == pb.OFF_POLICY_MASK_REFERENCE_ROLLOUT else ref  # type: ignore[assignment]
    return out


def output_selection(outputs: Sequence[str]) -> pb.OutputSelection:
    sel = pb.OutputSelection()
    for name in outputs:
        setattr(sel, name, True)
    return sel


# A trainer sends the same configuration every step: building it and its proto cost ~17 us
# of a 4k-token call's ~70 us of client Python, so both are remembered (for hashable arguments).
@functools.lru_cache(maxsize=64)
def _built_config(config: cfg.LossConfig | None, options: tuple[tuple[str, Any, Any], ...]) -> cfg.LossConfig:
    return cfg.build_loss_config(config, **{k: v for k, _, v in options})


def _build_messages(c: cfg.LossConfig) -> tuple[pb.LossConfig, pb.OutputSelection, dict[int, bytes]]:
    """(LossConfig, OutputSelection, both serialised as ComputeLossRequest's fields 1 and 3)."""
    proto_cfg, sel = loss_config_to_proto(c), output_selection(c.outputs)
    return proto_cfg, sel, {1: proto_cfg.SerializeToString(), 3: sel.SerializeToString()}


_config_messages = functools.lru_cache(maxsize=64)(_build_messages)  # shared: never mutated


def _loss_config(config: cfg.LossConfig | None, options: dict[str, Any]) -> cfg.LossConfig:
    """cfg.build_loss_config(config, **options), remembered when the arguments are hashable."""
    try:
        # (each value's type in the key: True == 1.0, and a remembered 1.0 answered for a refused True)
        plain = {k: cfg.plain_value(v) for k, v in options.items()}
        return _built_config(config, tuple(sorted((k, _types(p), p) for k, p in plain.items())))
    except TypeError:  # an unhashable value (e.g. outputs as a list), or a bad one: build it
        return cfg.build_loss_config(config, **options)


def _types(v: Any) -> Any:
    """`v`'s type, and a tuple's elements' ((True,) == (1,), and a remembered (1,) answered for
    a refused (True,)); TypeError for anything else inside a tuple (an array or a tensor: built
    each time, never remembered by identity)."""
    if not isinstance(v, tuple):
        return type(v)
    if not all(x is None or isinstance(x, (bool, int, float, str, tuple)) for x in v):
        raise TypeError("not remembered")
    return tuple(_types(x) for x in v)


def _messages(c: cfg.LossConfig) -> tuple[pb.LossConfig, pb.OutputSelection, dict[int, bytes]]:
    try:
        return _config_messages(c)
    except TypeError:  # an unhashable configuration
        return _build_messages(c)


# ---------------------------------------------------------------- the packed batch


@dataclass
class _Packed:
    """A batch in wire form: numpy arrays in the ragged layout, ready to be sliced into chunks."""

    layout: Layout
    token: dict[str, np.ndarray]  # per-token arrays, length N
    seq: dict[str, np.ndarray]  # per-sequence arrays, length B
    advantage_level: int

    @property
    def bytes_per_token(self) -> int:
        return sum(a.dtype.itemsize for a in self.token.values())

    @property
    def nbytes(self) -> int:
        return (
            sum(a.nbytes for a in self.token.values())
            + sum(a.nbytes for a in self.seq.values())
            + int(self.layout.offsets.nbytes)
        )

    def batch(self, s0: int = 0, s1: int | None = None) -> pb.Batch:
        """The proto Batch of sequences [s0, s1) with offsets rebased to 0."""
        return self.fill(pb.Batch(), s0, s1)

    def fill(self, msg: pb.Batch, s0: int = 0, s1: int | None = None) -> pb.Batch:
        """Fill `msg` (a Batch field, in place) with sequences [s0, s1), offsets rebased to 0."""
        off = self.layout.offsets
        b = self.layout.num_seqs
        s1 = b if s1 is None else s1
        t0, t1 = int(off[s0]), int(off[s1])
        whole = s0 == 0 and s1 == b
        msg.advantage_level = self.advantage_level  # type: ignore[assignment]
        sub_off = off if whole else off[s0 : s1 + 1] - t0
        _fill(msg.offsets, sub_off)
        for name, a in self.token.items():
            _fill(getattr(msg, name), a if whole else a[t0:t1])
        for name, a in self.seq.items():
            _fill(getattr(msg, name), a if whole else a[s0:s1])
        return msg

    def pieces(self, s0: int = 0, s1: int | None = None, at: int | None = None) -> _wire.Pieces:
        """The wire bytes of the Batch of sequences [s0, s1) (offsets rebased to 0), as pieces
        that reference the arrays' memory (joined once, by gRPC's serializer); `at`: see
        `_wire.batch`."""
        off = self.layout.offsets
        b = self.layout.num_seqs
        s1 = b if s1 is None else s1
        t0, t1 = int(off[s0]), int(off[s1])
        if s0 == 0 and s1 == b:
            return _wire.batch(self.token, self.seq, off, self.advantage_level, at)
        token = {k: a[t0:t1] for k, a in self.token.items()}
        seq = {k: a[s0:s1] for k, a in self.seq.items()}
        return _wire.batch(token, seq, off[s0 : s1 + 1] - t0, self.advantage_level, at)

    def placed(self, s0: int = 0, s1: int | None = None) -> _wire.Pieces | Callable[[int], _wire.Pieces]:
        """`pieces(s0, s1)` for `_wire.message`: placed so that the server can read the
        tensors in place when the part is large enough for it to try."""
        off = self.layout.offsets
        s1 = self.layout.num_seqs if s1 is None else s1
        size = (int(off[s1]) - int(off[s0])) * self.bytes_per_token
        if size < _wire.ALIGN_MIN_BYTES:
            return self.pieces(s0, s1)
        return functools.partial(self.pieces, s0, s1)

    def chunk_bounds(self, chunk_bytes: int, out_bytes_per_token: int = 0) -> list[tuple[int, int]]:
        """Consecutive sequence ranges [s0, s1), as long as possible, each of whose request Batch
        and response outputs (`out_bytes_per_token` per token) take at most `chunk_bytes` on the
        wire; a sequence larger than that alone travels alone. Groups may span chunks."""
        off = self.layout.offsets
        b = self.layout.num_seqs
        per_tok = max(self.bytes_per_token, out_bytes_per_token)
        per_seq = sum(a.dtype.itemsize for a in self.seq.values()) + off.dtype.itemsize
        # the data bytes of sequences [0, i): strictly increasing, since per_seq > 0
        end = off * per_tok + np.arange(b + 1, dtype=np.int64) * per_seq
        room = chunk_bytes - _CHUNK_HEAD_BYTES
        out: list[tuple[int, int]] = []
        s0 = 0
        while s0 < b:  # one step per chunk
            s1 = max(s0 + 1, int(np.searchsorted(end, end[s0] + room, side="right")) - 1)
            out.append((s0, s1))
            s0 = s1
        return out or [(0, b)]


def _advantage_level(level: str | None) -> int:
    if level is None:
        return pb.ADVANTAGE_LEVEL_UNSPECIFIED
    return _enum(pb.AdvantageLevel, "ADVANTAGE_LEVEL", level, "batch.advantage_level")


def pack_batch(
    logp: Any,
    old_logp: Any = None,
    *,
    mask: Any = None,
    offsets: Any = None,
    lengths: Any = None,
    rewards: Any = None,
    group_ids: Any = None,
    advantages: Any = None,
    ref_logp: Any = None,
    rollout_logp: Any = None,
    advantage_level: str | None = None,
    sum_pi_squared: Any = None,
) -> _Packed:
    """Check shapes and pack a batch in the service's ragged layout (no per-element Python)."""
    try:
        lp = float_array(logp, "logp")
        layout = make_layout(lp, mask=mask, offsets=offsets, lengths=lengths)
        token: dict[str, np.ndarray] = {"logp": layout.flatten(lp, "logp")}
        for name, x in (
            ("old_logp", old_logp),
            ("ref_logp", ref_logp),
            ("rollout_logp", rollout_logp),
            ("sum_pi_squared", sum_pi_squared),
        ):
            if x is not None:  # (every float travels in logp's dtype: the wire has one per batch)
                token[name] = _in_dtype(layout.flatten(x, name), lp.dtype, name, layout)
        if layout.mask is not None:
            token["mask"] = layout.mask
        seq: dict[str, np.ndarray] = {}
        level = _advantage_level(advantage_level)
        if advantages is not None:
            level = _place_advantages(float_array(advantages, "advantages"), layout, level, token, seq)
            if level == pb.ADVANTAGE_LEVEL_TOKEN:
                token["advantages"] = _in_dtype(token["advantages"], lp.dtype, "advantages", layout)
            else:
                seq["advantages"] = _in_dtype(seq["advantages"], lp.dtype, "advantages", None)
        seq.update(_rewards_and_groups(rewards, group_ids, layout.num_seqs))
    except ArrayInputError as e:
        raise _refusal(e, "batch.") from None
    return _Packed(layout=layout, token=token, seq=seq, advantage_level=level)


def _in_dtype(a: np.ndarray, dtype: np.dtype, name: str, layout: Layout | None) -> np.ndarray:
    """`a` cast to the batch's float dtype; a finite value that overflows it is refused (it went
    as infinity, refused as `non_finite` though given finite; an audit). `layout`: a per-token `a`'s."""
    if a.dtype == dtype:
        return a
    if a.dtype.itemsize <= dtype.itemsize:
        return a.astype(dtype)
    with np.errstate(over="ignore"):
        out = a.astype(dtype)
    inf = np.isinf(out)  # (the one extra pass, and only when a cast narrows)
    if inf.any():
        bad = inf & np.isfinite(a)
        if bad.any():
            i = int(np.argmax(bad))
            why = f"overflow: {float(a[i]):g} does not fit in {dtype}, logp's dtype"
            if layout is not None and layout.padded is not None:
                why += f" ({_padded_place(layout.offsets, i)})"
            raise ArrayInputError(name, why, i)
    return out


def _padded_place(offsets: np.ndarray, k: int) -> str:
    """Where token `k` of the ragged batch sent lies in the caller's padded [B, T] input."""
    row = int(np.searchsorted(offsets, k, side="right")) - 1
    return f"row {row}, column {k - int(offsets[row])} of the padded input"


def _rewards_and_groups(
    rewards: Any, group_ids: Any, b: int | None, components: bool = False
) -> dict[str, np.ndarray]:
    """Rewards (int64, float32 or float64) and int64 group ids as sent, [B] each (`b` None:
    B is the rewards' length; `components`: rewards [B, K] too, `advantages`'); the one check
    of both `loss` and `advantages`."""
    out: dict[str, np.ndarray] = {}
    if rewards is not None:
        if is_torch(rewards) and rewards.dtype.is_floating_point and rewards.element_size() < 4:
            rewards = rewards.detach().float()  # a reward model's bf16 / fp16: exact in float32,
        r = to_numpy(rewards, "rewards")  # and the engine takes them too (reduced in float64)
        if is_half(r):  # (numpy's float16, JAX's bfloat16 / float8: exact in float32)
            r = r.astype(np.float32)
        if r.dtype.kind in "biu":
            r = int_array(r, "rewards")
        elif r.dtype not in (np.float32, np.float64):
            r = float_array(r, "rewards")
        if components and r.ndim == 2:
            out["rewards"] = np.ascontiguousarray(r)  # (K components a sequence, row-major)
        elif components and r.ndim > 2:
            raise ArrayInputError(
                "rewards", f"bad_shape: {tuple(r.shape)}; expected (B,) or (B, K) reward components"
            )
        elif r.ndim == 2 and not components:
            why = "loss() takes one reward a sequence: K reward components go to advantages(), its advantages here"
            raise ArrayInputError("rewards", f"bad_shape: {tuple(r.shape)}; {why}")
        else:
            out["rewards"] = _per_seq(r, "rewards", b)
        b = r.shape[0]
    if group_ids is not None:
        g = to_numpy(group_ids, "group_ids")
        if g.dtype.kind not in "biu" and g.size:  # ([] is float64 to numpy: an empty batch, served)
            raise ArrayInputError("group_ids", f"bad_dtype: {g.dtype}; expected integers")
        out["group_ids"] = _per_seq(int_array(g, "group_ids"), "group_ids", b)
    return out


def _refusal(e: ArrayInputError, prefix: str) -> InvalidArgumentError:
    """A client-side input problem as the server would report it (`prefix`: the request path)."""
    where = f"{prefix}{e.field}" if e.index is None else f"{prefix}{e.field}[{e.index}]"
    return invalid_argument(where, e.reason)


def _place_advantages(
    adv: np.ndarray, layout: Layout, level: int, token: dict[str, np.ndarray], seq: dict[str, np.ndarray]
) -> int:
    """Put caller advantages in the per-sequence or per-token arrays; return the level sent."""
    b, n = layout.num_seqs, layout.num_tokens
    seq_level, tok_level = pb.ADVANTAGE_LEVEL_SEQUENCE, pb.ADVANTAGE_LEVEL_TOKEN
    per_seq = f"({b},) per sequence"
    per_tok = f"{layout.padded} per token" if layout.padded else f"({n},) per token"
    want = f"{per_seq} or {per_tok}"
    if level == seq_level:
        want = f"{per_seq} (advantage_level='sequence')"
    elif level == tok_level:
        want = f"{per_tok} (advantage_level='token')"
    bad_shape = f"bad_shape: {tuple(adv.shape)}; expected {want}"
    if adv.ndim == 2:
        if adv.shape == (b, 1) and layout.padded != (b, 1):  # (TRL's `advantages.unsqueeze(1)`)
            bad_shape += " (pass advantages.squeeze(-1) for one per sequence)"
        if layout.padded is None or level == seq_level or adv.shape != layout.padded:
            raise ArrayInputError("advantages", bad_shape)
        token["advantages"] = layout.flatten(adv, "advantages")
        return tok_level
    if adv.ndim != 1:
        raise ArrayInputError("advantages", bad_shape)
    fits_seq = adv.shape[0] == b
    fits_tok = layout.padded is None and adv.shape[0] == n
    if level == pb.ADVANTAGE_LEVEL_UNSPECIFIED:
        if fits_seq and fits_tok:
            lengths = np.diff(layout.offsets)
            if not bool((lengths == 1).all()):
                raise ArrayInputError(
                    "advantages", "ambiguous: B == N; pass advantage_level='sequence' or 'token'"
                )
            level = tok_level
        elif fits_seq:
            level = seq_level
        elif fits_tok:
            level = tok_level
    if level == seq_level and fits_seq:
        seq["advantages"] = adv
    elif level == tok_level and fits_tok:
        token["advantages"] = adv
    else:
        raise ArrayInputError("advantages", bad_shape)
    return level


def _per_seq(a: np.ndarray, name: str, b: int | None) -> np.ndarray:
    if a.ndim != 1 or (b is not None and a.shape[0] != b):
        want = "B" if b is None else b
        raise ArrayInputError(name, f"bad_shape: {tuple(a.shape)}; expected ({want},), one per sequence")
    return a


# ---------------------------------------------------------------- the client


class SoftgateClient:
    """A client of one softgate service (a host:port, or a DNS name whose addresses calls
    are spread over, e.g. `dns:///softgate.softgate.svc.cluster.local:50051`: the headless
    Service of deploy/k8s).

    target: `host:port`, `dns:///name:port`, `unix:/path` (no port: 50051).
    tls / root_certificates / client_cert / client_key: TLS (root CA PEM bytes or a path; None:
    the OS's CA bundle, see docs/client.md) and mTLS (client certificate chain and key), checked
    at construction (ValueError naming the argument). server_name_override: the host name the
    server's certificate is checked against instead of the target's (a certificate for
    `softgate.internal` reached through an IP or a tunnel).
    retries: None (default): retried until `retry_budget`; an int >= 1: also at most that many
    attempts in all; or a RetryPolicy. retry_budget: seconds a call keeps retrying UNAVAILABLE
    and a busy server (default 60, within `timeout`; a wrong address fails only then: a call
    still retrying after 5 s logs a warning on the `softgate_client` logger).
    timeout: seconds per call including retries (None or math.inf: no deadline).
    run: the training run's name, sent as metadata `softgate-run` (labels the server's metrics).
    max_message_bytes: the channel's message size limit (both ways).
    stream_threshold_bytes: calls whose request or response is larger than this go over
    StreamLoss (default 90% of max_message_bytes); stream_chunk_bytes: the largest streamed
    chunk, request and response (a sequence larger than that travels alone).
    channel_options: extra gRPC channel arguments (`{"grpc.default_compression_algorithm": 2}`),
    over the client's own. channel: a channel of the caller's (an intercepted one, say), used
    as is instead of one built from the arguments above (its receive limit, gRPC's 4 MiB by
    default, bounds a unary call: one it refuses is sent again streamed under 90% of it).

    A client may be shared by threads, and by processes forked after it was made (a
    DataLoader's workers): a child's first call builds its own channel, and a fork waits for
    the calls in flight (see _fork). It pickles as its arguments (a spawned worker's copy builds
    its own channel). close() it when done; a closed client raises ValueError.
    """

    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        tls: bool = False,
        root_certificates: bytes | str | None = None,
        client_cert: bytes | str | None = None,
        client_key: bytes | str | None = None,
        retries: int | RetryPolicy | None = None,
        retry_budget: float | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        run: str | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        stream_threshold_bytes: int | None = None,
        stream_chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        server_name_override: str | None = None,
        channel_options: dict[str, Any] | None = None,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.target = target
        # every argument checked here, by name: a bad one failed at the first call, the first
        # retry or inside gRPC (OverflowError), or was silently taken (retries=0 as 1)
        policy = retries
        if not isinstance(policy, RetryPolicy):
            also = " (attempts in all; 1: no retry), None or a RetryPolicy"
            attempts = None if retries is None else _count(retries, "retries", also=also)
            policy = RetryPolicy(max_attempts=attempts)
        if retry_budget is not None:
            budget = _seconds(retry_budget, "retry_budget", " (math.inf: until timeout)")
            policy = dataclasses.replace(policy, budget=budget)
        self.retry_policy = policy
        self.timeout = timeout_seconds(timeout)
        _check_run(run)
        self.run = run
        # (gRPC's channel arguments are 32-bit ints)
        self.max_message_bytes = _count(max_message_bytes, "max_message_bytes", most=2**31 - 1)
        self._threshold_bytes = (
            _count(
                stream_threshold_bytes, "stream_threshold_bytes", also=", or None (90% of max_message_bytes)"
            )
            if stream_threshold_bytes is not None
            else int(self.max_message_bytes * 0.9)
        )
        # each streamed message must fit the limit; the threshold only says when to stream
        chunk = _count(stream_chunk_bytes, "stream_chunk_bytes")
        self._chunk_bytes = int(min(chunk, self.max_message_bytes * 0.9))
        self._channel_args: dict[str, Any] = {
            "tls": tls,
            "root_certificates": root_certificates,
            "client_cert": client_cert,
            "client_key": client_key,
            "max_message_bytes": self.max_message_bytes,
            "server_name_override": server_name_override,
            "options": channel_options,
        }
        # what a connection the server closed before answering hints at (None: the caller's channel)
        self._transport = None
        if channel is None:
            self._transport = "plaintext"
            if uses_tls(tls, root_certificates, client_cert):
                self._transport = "mtls" if client_cert is not None else "tls"
        self._own_channel = channel is None
        self._closed = False
        self.last_result: LossResult | None = None
        self._connect(channel)

    def _connect(self, channel: grpc.Channel | None = None) -> None:
        """(Re)build the channel, its RPCs and what was learnt from the server over it. The
        process is recorded last: a forked child's failed rebuild is tried again by its next
        call, never left on the inherited channel."""
        ch = channel or make_channel(self.target, **self._channel_args)
        stub = pb_grpc.LossServiceStub(ch)
        # the loss RPCs with hand-built request bytes and zero-copy response arrays (see _wire)
        compute_loss = ch.unary_unary(
            f"/{SERVICE}/ComputeLoss",
            request_serializer=_wire.Pieces.join,
            response_deserializer=_parse_loss_response,
        )
        stream_loss = ch.stream_stream(
            f"/{SERVICE}/StreamLoss",
            request_serializer=_wire.Pieces.join,
            response_deserializer=_parse_stream_response,
        )
        self._channel, self._stub = ch, stub
        self._compute_loss, self._stream_loss_rpc = compute_loss, stream_loss
        self._answered = False  # a call over this channel has succeeded
        self._forget_limit()
        self._pid = os.getpid()

    def _forget_limit(self) -> None:
        """Forget the server's message limit (asked again by the next large call)."""
        self._server_max_message_bytes: int | None = None
        self._server_max_stream_chunks = 0  # (0: none known)
        self.stream_threshold_bytes = self._threshold_bytes
        self.stream_chunk_bytes = self._chunk_bytes

    def _live(self) -> None:
        """Check the client can call: not closed, and in a forked child on a channel of its own
        (the inherited one's calls can hang past their deadline: its threads stayed in the parent)."""
        if self._closed:
            raise ValueError("SoftgateClient is closed")
        if os.getpid() == self._pid:
            return
        if not self._own_channel:
            raise RuntimeError(
                "a SoftgateClient built with channel= cannot be used after fork(): build one in the child process"
            )
        with rebuild_lock():  # one rebuild, which a child's other first calls wait for
            if os.getpid() != self._pid:
                inherited = self._channel
                self._connect()
                keep_inherited(inherited)

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle as the constructor's arguments (a spawn / forkserver worker's copy, a
        multiprocessing argument): the copy builds a channel of its own where it is unpickled."""
        if not self._own_channel:  # (its channel's arguments are not the client's to know)
            raise TypeError("a SoftgateClient built with channel= cannot be pickled: build one in the worker")
        if self._closed:
            raise ValueError("SoftgateClient is closed")
        a = self._channel_args
        kw = {
            "tls": a["tls"],
            "root_certificates": a["root_certificates"],
            "client_cert": a["client_cert"],
            "client_key": a["client_key"],
            "server_name_override": a["server_name_override"],
            "channel_options": a["options"],
            "max_message_bytes": self.max_message_bytes,
            "retries": self.retry_policy,  # (its budget too)
            "timeout": math.inf if self.timeout is None else self.timeout,
            "run": self.run,
            "stream_threshold_bytes": self._threshold_bytes,
            "stream_chunk_bytes": self._chunk_bytes,
        }
        return (functools.partial(type(self), self.target, **kw), ())

    # -------------------------------------------------------- plumbing

    def close(self) -> None:
        """Close the channel; later calls raise ValueError. (In a forked child that never
        called, the channel is the parent's and is left alone.)"""
        self._closed = True
        if os.getpid() == self._pid:
            self._channel.close()

    def __enter__(self) -> SoftgateClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _metadata(self, run: str | None) -> tuple[tuple[str, str], ...]:
        _check_run(run)  # (every call's run reads here)
        r = run if run is not None else self.run
        return ((RUN_METADATA_KEY, _run_label(r)),) if r else ()

    def _deadline(self, timeout: float | None) -> float | None:
        """The call's deadline (time.monotonic): `timeout` None is the client's."""
        t = self.timeout if timeout is None else timeout_seconds(timeout)
        return None if t is None else time.monotonic() + t

    def _call(self, fn: Callable[[float | None], T], deadline: float | None) -> T:
        """`fn(timeout)` with the client's retries, until `deadline`."""

        def attempt(t: float | None) -> T:
            with in_flight(t):  # (a fork waits for it, and it for a fork, within t: see _fork)
                return fn(_left(deadline))

        try:
            out = call_with_retries(
                attempt, policy=self.retry_policy, timeout=_left(deadline), target=self.target
            )
        except UnavailableError as e:
            raise self._hinted(e) from None
        self._answered = True
        return out

    def _hinted(self, e: UnavailableError) -> UnavailableError:
        """`e` with the likely cause when the server closed the connection before this channel
        got any answer: a TLS mismatch (gRPC says only `Socket closed`)."""
        if self._answered or self._transport is None or "Socket closed" not in e.details:
            return e
        hint = {
            "plaintext": "(the server may speak TLS: pass tls=True / root_certificates)",
            "tls": "(the server may require a client certificate: mutual TLS)",
            "mtls": "(the server may not trust client_cert: mutual TLS)",
        }[self._transport]
        details = e.details.replace("Socket closed", f"Socket closed {hint}", 1)
        return e.replaced(details)

    def _ask_limit(self, deadline: float | None) -> None:
        """Ask the server's message limit and stream chunk count limit (ListAlgorithms, one
        attempt of at most _LIMIT_PROBE_S, within the call's `deadline`) and lower the stream
        threshold and chunk to 90% of the message limit. A failed ask leaves them as they are and is asked again by the next
        large call."""
        end = time.monotonic() + _LIMIT_PROBE_S
        deadline = end if deadline is None else min(deadline, end)
        try:
            request = pb.ListAlgorithmsRequest()
            with in_flight(_left(deadline)):
                limits = self._stub.ListAlgorithms(
                    request, timeout=_left(deadline), metadata=self._metadata(None)
                ).limits
            self._server_max_message_bytes = int(limits.max_message_bytes)
            self._server_max_stream_chunks = int(limits.max_stream_chunks)
        except grpc.RpcError as err:
            if err.code() == grpc.StatusCode.UNIMPLEMENTED:  # not a softgate server: the call will tell
                self._server_max_message_bytes = 0
        except DeadlineExceededError:  # a fork under way outlasted the ask: the call waits in turn
            pass
        if self._server_max_message_bytes:
            server_cap = int(self._server_max_message_bytes * 0.9)
            self.stream_threshold_bytes = min(self.stream_threshold_bytes, server_cap)
            self.stream_chunk_bytes = min(self.stream_chunk_bytes, server_cap)

    # -------------------------------------------------------- RPCs

    def algorithms(self, *, timeout: float | None = None) -> pb.ListAlgorithmsResponse:
        """The server's catalogue: objectives, estimators, aggregations with parameters and
        defaults, metric names and the server's limits (a proto message)."""
        self._live()
        return self._call(
            lambda t: self._stub.ListAlgorithms(
                pb.ListAlgorithmsRequest(), timeout=t, metadata=self._metadata(None)
            ),
            self._deadline(timeout),
        )

    def advantages(
        self,
        rewards: Any,
        group_ids: Any,
        *,
        estimator: str | None = None,
        scale: str | None = None,
        eps: float | None = None,
        min_group_std: float | None = None,
        reward_weights: Any = None,
        skip_nan_components: bool | None = None,
        config: cfg.AdvantageConfig | None = None,
        token_counts: Any = None,
        timeout: float | None = None,
        run: str | None = None,
    ) -> AdvantagesResult:
        """Per-sequence advantages from per-sequence rewards ([B], or [B, K]: K reward
        components, for `estimator="gdpo"` or their sum weighted by `reward_weights`) and group
        ids. `token_counts` ([B] integers, each sequence's trained tokens): the
        reinforce_pp(_baseline) and gdpo whitening weights and opo's baseline weights, as `loss`
        weighs the sequences, so that micro-batches sent with these advantages train on
        `loss`'s own values; None: every sequence weighs 1. `skip_nan_components=True`: a NaN
        component does not apply to its sequence (TRL's reward function returning None)."""
        self._live()
        if config is not None and not isinstance(config, cfg.AdvantageConfig):
            raise invalid_argument(
                "config", f"bad_type: expected an AdvantageConfig, got {type(config).__name__}"
            )
        given = {
            "estimator": estimator,
            "scale": scale,
            "eps": eps,
            "min_group_std": min_group_std,
            "reward_weights": reward_weights,
            "skip_nan_components": skip_nan_components,
        }
        # the config's other fields as they are (gamma, position, zero_tail: the server refuses
        # them here, one advantage per sequence; dropped, they were silently ignored)
        c = dataclasses.replace(
            config or cfg.AdvantageConfig(), **{k: v for k, v in given.items() if v is not None}
        )
        try:
            seq = _rewards_and_groups(rewards, group_ids, None, components=True)
            if token_counts is not None:  # (whole-number floats too: a float mask's mask.sum(-1))
                b = seq["rewards"].shape[0] if "rewards" in seq else None
                seq["token_counts"] = _per_seq(int_array(token_counts, "token_counts"), "token_counts", b)
        except ArrayInputError as e:
            raise _refusal(e, "") from None
        req = pb.ComputeAdvantagesRequest()
        for name, a in seq.items():  # a missing one: the server says so
            _fill(getattr(req, name), a)
        req.config.CopyFrom(loss_config_to_proto(cfg.LossConfig(advantages=c)).advantages)
        resp = self._call(
            lambda t: self._stub.ComputeAdvantages(req, timeout=t, metadata=self._metadata(run)),
            self._deadline(timeout),
        )
        return AdvantagesResult(advantages=_array(resp.advantages), metrics=_metrics(resp.metrics))

    def loss(
        self,
        logp: Any,
        old_logp: Any = None,
        *,
        mask: Any = None,
        offsets: Any = None,
        lengths: Any = None,
        rewards: Any = None,
        group_ids: Any = None,
        advantages: Any = None,
        ref_logp: Any = None,
        rollout_logp: Any = None,
        advantage_level: str | None = None,
        sum_pi_squared: Any = None,
        config: cfg.LossConfig | None = None,
        stream: bool | None = None,
        timeout: float | None = None,
        run: str | None = None,
        **options: Any,
    ) -> LossResult:
        """Loss, exact gradient d loss / d logp and metrics of one batch.

        Batch: `logp` padded [B, T] (+ `mask` [B, T], or `lengths` [B]) or ragged [N]
        (+ `offsets` [B + 1] or `lengths` [B], optional `mask` [N]); numpy arrays or torch
        tensors. `old_logp` None means on-policy. Either `rewards` + `group_ids` ([B]) or
        `advantages` ([B] per sequence, or per token like logp). `sum_pi_squared` (like logp):
        each token's sum of squared probabilities, for `estimator="optimal_token_baseline"`;
        with any estimator it gives the metrics `variance_proxy_*` (verl's variance proxy).

        Configuration: a `config=LossConfig(...)` and/or flat keywords: `objective`
        ("sapo", "grpo", "gspo", "gspo_token", "cispo", "gppo", "gmpo", "dppo_tv", "dppo_kl",
        "clip_cov", "kl_cov", "reinforce", "sapo_seq", "cispo_seq", "dro" or an Objective), its
        parameters (`tau_pos`, `tau_neg`, `eps_low`, `eps_high`, `dual_clip`, `ratio_cap`,
        `fraction`, `cov_low`, `cov_high`, `seed`, `coef`),
        `estimator`, `scale`, `baseline_position`, `zero_tail`, `aggregation` (mode name), `num_tokens`, `num_seqs`, `constant`,
        `kl_beta`, `kl_estimator`, `kl_aggregation`, `kl_value_clamp`, `kl_weight`,
        `mismatch=MismatchConfig(...)`,
        a KL in the reward (`reward_kl_beta`, `reward_kl_estimator`, `reward_kl_level`,
        `reward_kl_value_clamp`), `log_ratio_clamp`,
        `off_policy_mask_threshold` (and `off_policy_mask_reference`: "rollout" or "old"),
        `rejection=(RejectionCriterion(...), ...)` or verl's
        `rollout_rs=` with `rollout_rs_threshold=` (and an earlier verl's
        `rollout_rs_threshold_lower=`), verl's `rollout_token_veto_threshold=`,
        `saturation_threshold`, and `outputs=("ratio", "gate_weight", ...)`.

        `stream` forces (True) or forbids (False) the StreamLoss RPC; None picks it when the
        request or the response is larger than `stream_threshold_bytes`.
        """
        c = _loss_config(config, options)
        packed = pack_batch(
            logp,
            old_logp,
            mask=mask,
            offsets=offsets,
            lengths=lengths,
            rewards=rewards,
            group_ids=group_ids,
            advantages=advantages,
            ref_logp=ref_logp,
            rollout_logp=rollout_logp,
            advantage_level=advantage_level,
            sum_pi_squared=sum_pi_squared,
        )
        try:
            return self.loss_packed(packed, c, stream=stream, timeout=timeout, run=run)
        except InvalidArgumentError as e:
            if packed.layout.padded is None:
                raise
            raise _with_padded_positions(e, packed) from None

    def loss_packed(
        self,
        packed: _Packed,
        c: cfg.LossConfig,
        *,
        stream: bool | None = None,
        timeout: float | None = None,
        run: str | None = None,
    ) -> LossResult:
        """`loss` for an already packed batch (see `pack_batch`)."""
        self._live()
        if not isinstance(packed, _Packed):  # (an AttributeError inside, naming nothing; an audit)
            raise invalid_argument(
                "packed", f"bad_type: expected pack_batch's result, got {type(packed).__name__}"
            )
        if not isinstance(c, cfg.LossConfig):
            raise cfg._not_a("config", cfg.LossConfig, c)
        if stream is not None and not isinstance(stream, bool):  # (stream=0 was taken as by size)
            raise ValueError(f"stream: {stream!r} must be True, False or None (by size)")
        proto_cfg, sel, fields = _messages(c)
        out_per_token = _out_bytes_per_token(packed, sel)
        deadline = self._deadline(timeout)
        md = self._metadata(run)
        try:
            result = self._loss_call(packed, proto_cfg, sel, fields, out_per_token, stream, md, deadline)
        except ResourceExhaustedError as e:
            if stream is False or "larger than max" not in e.details:
                raise
            own = _OWN_LIMIT.search(e.details)
            if own:  # this client's channel's limit (a caller's channel= keeps gRPC's 4 MiB
                # receive limit): keep every later call's messages under 90% of it too
                cap = int(int(own.group(1)) * 0.9)
                self._threshold_bytes = min(self._threshold_bytes, cap)
                self._chunk_bytes = min(self._chunk_bytes, cap)
            # else the server's limit is not the one asked (a restart with another limit, pods
            # with mixed limits): ask it again, once; either way plan the call anew in the time left
            self._forget_limit()
            result = self._loss_call(packed, proto_cfg, sel, fields, out_per_token, stream, md, deadline)
        self.last_result = result
        return result

    def _loss_call(
        self,
        packed: _Packed,
        proto_cfg: pb.LossConfig,
        sel: pb.OutputSelection,
        fields: dict[int, bytes],
        out_per_token: int,
        stream: bool | None,
        md: tuple[tuple[str, str], ...],
        deadline: float | None,
    ) -> LossResult:
        """One loss call, unary or streamed (`stream` None: as large as it is)."""
        if stream is not False:  # the call's larger message, request or response (asking the
            # server's limit the first time it is large: that limit bounds the streamed chunks too)
            nbytes = max(packed.nbytes, packed.layout.num_tokens * out_per_token)
            if nbytes > _LIMIT_PROBE_ABOVE and self._server_max_message_bytes is None:
                self._ask_limit(deadline)
            stream = nbytes > self.stream_threshold_bytes or stream is True
        if stream:
            return self._stream_loss(packed, proto_cfg, sel, out_per_token, md, deadline)
        req = _wire.message(fields, {2: packed.placed()})
        resp, outs = self._call(lambda t: self._compute_loss(req, timeout=t, metadata=md), deadline)
        return _result(resp.loss, resp.policy_loss, resp.kl_loss, resp.metrics, outs, packed.layout)

    def _stream_loss(
        self,
        packed: _Packed,
        proto_cfg: pb.LossConfig,
        sel: pb.OutputSelection,
        out_per_token: int,
        md: tuple[tuple[str, str], ...],
        deadline: float | None,
    ) -> LossResult:
        """`out_per_token`: the response's bytes per token (_out_bytes_per_token)."""
        bounds = packed.chunk_bounds(self.stream_chunk_bytes, out_per_token)
        if self._server_max_message_bytes is None and len(bounds) > 1:
            # a small call forced to stream (stream=True) never asked the server's limits:
            # its chunk count may exceed max_stream_chunks
            self._ask_limit(deadline)
            bounds = packed.chunk_bounds(self.stream_chunk_bytes, out_per_token)
        most = self._server_max_stream_chunks
        if most and len(bounds) > most:  # the server refuses more: the largest chunks a message holds
            largest = min(self.max_message_bytes, self._server_max_message_bytes or self.max_message_bytes)
            bounds = packed.chunk_bounds(int(largest * 0.9), out_per_token)
        self._refuse_oversized(packed, bounds, out_per_token)

        def requests() -> Iterator[_wire.Pieces]:
            for k, (s0, s1) in enumerate(bounds):
                small: dict[int, Any] = {1: proto_cfg, 2: sel} if k == 0 else {}
                yield _wire.message(small, {3: packed.placed(s0, s1)})

        def call(t: float | None) -> list[tuple[pb.StreamLossResponse, dict[str, np.ndarray]]]:
            return list(self._stream_loss_rpc(requests(), timeout=t, metadata=md))

        try:
            responses = self._call(call, deadline)
        except InvalidArgumentError as e:
            raise _unchunked(e, packed, bounds) from None
        responses.sort(key=lambda r: r[0].chunk_index)
        if [r.chunk_index for r, _ in responses] != list(range(len(bounds))):
            raise InternalError(
                f"the stream answered {len(responses)} chunk(s) for the {len(bounds)} sent "
                f"(chunk_index {[r.chunk_index for r, _ in responses][:8]}): a non-conforming server"
            )
        outs: dict[str, np.ndarray] = {}
        for name in _requested(sel):
            parts = [o[name] for _, o in responses if name in o]
            if parts:
                outs[name] = parts[0] if len(parts) == 1 else np.concatenate(parts)
        summary = responses[-1][0].summary if responses else pb.LossSummary()
        result = _result(
            summary.loss, summary.policy_loss, summary.kl_loss, summary.metrics, outs, packed.layout
        )
        result.streamed = True
        result.chunks = len(bounds)
        return result

    def _refuse_oversized(self, packed: _Packed, bounds: list[tuple[int, int]], out_per_token: int) -> None:
        """Refuse, naming it, a sequence that travels alone and still cannot fit a message (the
        server's limit or this client's): gRPC would only say `larger than max (1600086 vs. 1048576)`."""
        limit, whose = self.max_message_bytes, "this client's"
        if 0 < (self._server_max_message_bytes or 0) < limit:
            limit, whose = int(self._server_max_message_bytes or 0), "the server's"
        off = packed.layout.offsets
        per_seq = sum(a.dtype.itemsize for a in packed.seq.values()) + off.dtype.itemsize
        for s0, s1 in bounds:
            if s1 - s0 != 1:
                continue
            n = int(off[s1]) - int(off[s0])
            size = max(n * packed.bytes_per_token + per_seq, n * out_per_token)  # its data alone
            if size > limit:
                raise invalid_argument(
                    f"batch.offsets[{s0}]",
                    f"too_large: sequence {s0} has {n} tokens, {size} bytes in one message, over "
                    f"{whose} max_message_bytes {limit}; split the sequence or raise that limit",
                )


_TOKEN_FIELD = re.compile(r"batch\.(\w+)\[(\d+)\]")
_CHUNK_FIELD = re.compile(r"chunk(?:\[(\d+)\])?\.(\w+)(?:\[(\d+)\])?")


def _remapped(
    e: InvalidArgumentError, remap: Callable[[FieldViolation], FieldViolation]
) -> InvalidArgumentError:
    """`e` with `remap` applied to each of its violations, in its message too."""
    out = [remap(v) for v in e.violations]
    return e.replaced(_relisted(e.details, e.violations, out), out)


def _relisted(message: str, old: list[FieldViolation], new: list[FieldViolation]) -> str:
    """The server's message (`invalid input: v1; v2 ...`, the violations in order, as many as fit)
    with each of `old` it lists replaced by `new`'s: a streamed batch's first line named the chunk."""
    parts, pos = [], 0
    for o, n in zip(old, new, strict=True):
        i = message.find(str(o), pos)
        if i >= 0:  # (not there: cut off by the server's message limit)
            parts += [message[pos:i], str(n)]
            pos = i + len(str(o))
    return "".join(parts) + message[pos:]


def _unchunked(
    e: InvalidArgumentError, packed: _Packed, bounds: list[tuple[int, int]]
) -> InvalidArgumentError:
    """`e` of a stream this client cut into the sequence ranges `bounds`, each violation of a
    chunk (`chunk[2].logp[1]`, `chunk.group_ids`) named in the batch the caller passed
    (`batch.logp[5]`), as a unary call names it; the chunk's name stays in the description."""

    def remap(v: FieldViolation) -> FieldViolation:
        m = _CHUNK_FIELD.fullmatch(v.field)
        if m is None:
            return v
        j, name, i = m.groups()
        field = f"batch.{name}"
        if i is not None:
            if j is None or int(j) >= len(bounds):  # not a chunk this client sent
                return v
            s0 = bounds[int(j)][0]
            start = s0 if name == "offsets" or name in packed.seq else int(packed.layout.offsets[s0])
            field += f"[{start + int(i)}]"
        return FieldViolation(field, f"{v.description} (in {v.field} of the stream)")

    return _remapped(e, remap)


def _with_padded_positions(e: InvalidArgumentError, packed: _Packed) -> InvalidArgumentError:
    """`e` with each per-token violation (`batch.logp[k]`, k a token of the ragged batch sent)
    of a padded batch also placed in the caller's [B, T] input: "(row i, column j ...)"."""
    off = packed.layout.offsets

    def remap(v: FieldViolation) -> FieldViolation:
        m = _TOKEN_FIELD.fullmatch(v.field)
        if m is None or m.group(1) not in packed.token or int(m.group(2)) >= packed.layout.num_tokens:
            return v
        return FieldViolation(v.field, f"{v.description} ({_padded_place(off, int(m.group(2)))})")

    return _remapped(e, remap)


def _parse_loss_response(data: bytes) -> tuple[pb.ComputeLossResponse, dict[str, np.ndarray]]:
    return _wire.split_response(data, 5, pb.ComputeLossResponse)


def _parse_stream_response(data: bytes) -> tuple[pb.StreamLossResponse, dict[str, np.ndarray]]:
    return _wire.split_response(data, 4, pb.StreamLossResponse)


def _requested(sel: pb.OutputSelection) -> list[str]:
    names = []
    if not sel.HasField("gradient") or sel.gradient:
        names.append("gradient")
    names.extend(n for n in cfg.OUTPUTS if getattr(sel, n))
    return names


def _out_bytes_per_token(packed: _Packed, sel: pb.OutputSelection) -> int:
    """Response bytes per token: the selected outputs, in the batch's float dtype (the masks BOOL)."""
    names = _requested(sel)
    bools = ("clip_mask" in names) + ("mask" in names)
    return (len(names) - bools) * packed.token["logp"].dtype.itemsize + bools


def _metrics(m: Any) -> dict[str, float]:
    """A response's metrics map as a dict: key by key, since `dict(m)` walks protobuf's map
    through collections.abc's Python-level iterator (33 metrics: 10.7 -> 6.3 us)."""
    return {k: m[k] for k in m}


def _result(
    loss: float,
    policy_loss: float,
    kl_loss: float,
    metrics: Any,
    outs: dict[str, np.ndarray],
    layout: Layout,
) -> LossResult:
    def shaped(name: str) -> np.ndarray | None:
        a = outs.get(name)
        if a is None:
            return None
        if a.shape[0] != layout.num_tokens:  # (never handed on: it would misalign every token)
            raise InternalError(
                f"the response's {name} has {a.shape[0]} values for the batch's {layout.num_tokens} "
                "tokens: a non-conforming server"
            )
        a = layout.unflatten(a, fill=False if a.dtype == np.bool_ else 0)
        a.flags.writeable = False  # as the response's own bytes are, in every layout
        return a

    grad = shaped("gradient")
    return LossResult(
        loss=float(loss),
        policy_loss=float(policy_loss),
        kl_loss=float(kl_loss),
        grad=grad if grad is not None else np.zeros(0, np.float32),
        metrics=_metrics(metrics),
        advantages=shaped("advantages"),
        ratio=shaped("ratio"),
        gate_weight=shaped("gate_weight"),
        clip_mask=shaped("clip_mask"),
        mask=shaped("mask"),
        offsets=layout.offsets,
    )
