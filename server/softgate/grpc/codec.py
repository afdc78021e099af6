"""softgate.v1 messages <-> engine objects: raw little-endian bytes to torch tensors (one memcpy,
no per-element Python), proto configs to engine configs, engine results to responses.

Every problem found here is collected as an engine `FieldViolation` named after the request
field ("batch.logp", "config.objective.sapo.tau_pos"), so that the caller raises one
`InputError` listing all of them. Shape claims are checked arithmetically against the bytes
actually received and the server's limits BEFORE anything is allocated.
"""

from __future__ import annotations

import itertools
import re
import struct
import sys
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

import numpy as np
import torch
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.unknown_fields import UnknownFieldSet
from softgate_client import _wire
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb
from torch import Tensor

from softgate.engine.batch import Batch
from softgate.engine.config import (
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
    Reinforce,
    RejectionCriterion,
    RewardKLConfig,
    Sapo,
    SapoSeq,
)
from softgate.engine.errors import FieldViolation, InputError
from softgate.engine.result import LossResult
from softgate.engine.transfer import to_host
from softgate.engine.validation import MAX_REJECTION_CRITERIA, MAX_REWARD_COMPONENTS

# the largest element count any shape may claim (far above every limit; guards the products),
# its 0 dimensions read as 1: [0, 2, 2**62] holds nothing, but its strides overflow int64
ABSURD_ELEMENTS = 1 << 50

DTYPES: dict[int, torch.dtype] = {
    pb.DTYPE_FLOAT32: torch.float32,
    pb.DTYPE_FLOAT64: torch.float64,
    pb.DTYPE_INT64: torch.int64,
    pb.DTYPE_INT32: torch.int32,
    pb.DTYPE_BOOL: torch.bool,
    pb.DTYPE_UINT8: torch.uint8,
    pb.DTYPE_INT8: torch.int8,
    pb.DTYPE_INT16: torch.int16,
    pb.DTYPE_FLOAT16: torch.float16,
    pb.DTYPE_BFLOAT16: torch.bfloat16,
}
TORCH_TO_PB: dict[torch.dtype, Any] = {v: k for k, v in DTYPES.items()}
_ITEMSIZE: dict[int, int] = {k: torch.empty(0, dtype=v).element_size() for k, v in DTYPES.items()}
_LITTLE = LITTLE_ENDIAN = sys.byteorder == "little"

# the batch's float tensors that must share logp's float dtype (rewards are read in float64)
SAME_DTYPE_AS_LOGP = ("old_logp", "ref_logp", "rollout_logp", "advantages", "sum_pi_squared")
_FLOAT_DTYPES = frozenset((torch.float32, torch.float64))
BATCH_TENSORS = (
    "logp",
    "offsets",
    "old_logp",
    "mask",
    "ref_logp",
    "rollout_logp",
    "rewards",
    "group_ids",
    "advantages",
    "sum_pi_squared",
)
OUTPUT_FIELDS = ("gradient", "advantages", "ratio", "gate_weight", "clip_mask", "mask")
# the outputs an engine result holds whole only when asked (Engine.loss sample_tokens)
TRUST_REGION_OUTPUTS = ("ratio", "gate_weight", "clip_mask")
BOOL_OUTPUTS = ("clip_mask", "mask")  # one byte a token; the others are in the compute dtype
# LossResult attribute of each output
_RESULT_ATTR = {
    "gradient": "grad",
    "advantages": "advantages",
    "ratio": "ratio",
    "gate_weight": "gate_weight",
    "clip_mask": "clip_mask",
    "mask": "mask",
}
# the engine's config field names (its violations are named config.*; a field left out here
# was named batch.reward_kl.* once)
CONFIG_ROOTS = tuple(f.name for f in dataclass_fields(LossConfig))


@dataclass(frozen=True)
class Limits:
    """Per request (per stream) caps; 0 means no limit."""

    max_tokens: int = 0
    max_sequences: int = 0
    max_groups: int = 0
    max_stream_chunks: int = 0  # messages in one StreamLoss stream


# ---------------------------------------------------------------- wire


@dataclass(frozen=True)
class CorruptMessage:
    """Stands for a request whose bytes are not a valid protobuf of `message` (so that the
    servicer, not grpcio, answers: INVALID_ARGUMENT with a BadRequest)."""

    message: str
    error: str

    def violation(self, field: str) -> FieldViolation:
        return FieldViolation(field, f"bad_protobuf: the bytes are not a valid {self.message} ({self.error})")


def safe_deserializer(cls: Any, batch_field: int | None = None) -> Any:
    """`cls.FromString`, returning a CorruptMessage instead of raising.

    With `batch_field` (the number of the message's Batch field) the result is a `Received`:
    the message, its wire size, and, for a large message, zero-copy views of its Batch
    tensors' bytes inside the received buffer (see `Received`)."""

    def deserialize(data: bytes) -> Any:
        views: dict[str, memoryview] = {}
        if len(data) >= SCAN_MIN_BYTES and (problem := _oversized(memoryview(data), cls.DESCRIPTOR)):
            return CorruptMessage(cls.DESCRIPTOR.full_name, problem)
        if batch_field is not None and len(data) >= VIEW_MIN_BYTES:
            views, stripped = _batch_views(data, batch_field)
            if stripped is not None:
                got = _parse_stripped(cls, stripped, batch_field, views)
                if got is not None:
                    return Received(got, len(data), views)
        try:
            msg = cls.FromString(data)
        except Exception as e:
            return CorruptMessage(cls.DESCRIPTOR.full_name, str(e)[:200] or type(e).__name__)
        if batch_field is None:
            return msg
        return Received(msg, len(data), views)

    return deserialize


# below this message size the copies views avoid cost less than finding the views
VIEW_MIN_BYTES = 1 << 20


@dataclass(frozen=True)
class Received:
    """A request as it came off the wire: the parsed `message`, its size in bytes, and
    `views`: Batch tensor name -> a memoryview of that tensor's `data` inside the received
    bytes. Reading `Tensor.data` from a parsed message copies the bytes on every access (upb);
    a view is the same bytes without a copy. A view exists only where the wire holds exactly
    one Batch and one occurrence of that tensor and of its data (what protobuf parsed is then
    exactly those bytes); anything else reads the parsed message. The `data` of a tensor with
    a view is left out of the parse (`_batch_views`): in `message` it reads empty, its 1-D
    `shape` says its length, and its bytes are the view's."""

    message: Any
    nbytes: int
    views: dict[str, memoryview]


@dataclass(frozen=True)
class Encoded:
    """A response serialised by hand (see `encode_loss_response`): its wire bytes."""

    data: bytes

    def __len__(self) -> int:
        return len(self.data)


def unwrap(request: Any) -> tuple[Any, Received | None]:
    """(the message, the Received it came in, if any)."""
    if isinstance(request, Received):
        return request.message, request
    return request, None


def serializer(cls: Any) -> Any:
    """The response serializer of a handler whose servicer may return an `Encoded`."""
    to_string = cls.SerializeToString

    def serialize(msg: Any) -> bytes:
        return msg.data if isinstance(msg, Encoded) else to_string(msg)

    return serialize


_BATCH_NAMES = {num: name for name, num in _wire.BATCH_FIELDS.items()}


# A request is walked here (in Python, on the event loop) before protobuf parses it: a message
# of softgate.v1 has a handful of fields at each level, so one of more is not a client's, and
# is refused rather than walked field by field (64 MiB of empty fields took 20 s; an audit).
MAX_FIELDS = 64
# A tensor's packed shape: 16 dimensions of the longest varint. protobuf expands each byte of a
# packed shape into an int64 (64 MiB of one-byte dimensions: +1.2 GB; an audit).
MAX_SHAPE_BYTES = 160
SCAN_MIN_BYTES = 1 << 16  # (a smaller message expands to at most 8x its size: no scan)


class _TooManyFields(ValueError):
    pass


def _fields(buf: memoryview, start: int, end: int) -> Iterable[tuple[int, int, int, int, int]]:
    """_wire.fields, raising _TooManyFields past MAX_FIELDS."""
    for k, field in enumerate(_wire.fields(buf, start, end)):
        if k == MAX_FIELDS:
            raise _TooManyFields(f"more than {MAX_FIELDS} fields in one message")
        yield field


def _once(buf: memoryview, start: int, end: int) -> dict[int, tuple[int, int, int] | None]:
    """field number -> (wire type, value start, value end), None when it occurs more than once."""
    seen: dict[int, tuple[int, int, int] | None] = {}
    for num, wire, _, a, b in _fields(buf, start, end):
        seen[num] = None if num in seen else (wire, a, b)
    return seen


def _oversized(buf: memoryview, desc: Any, start: int = 0, end: int | None = None) -> str | None:
    """Why a request of message type `desc` in `buf[start:end]` is refused before protobuf
    parses it (too many fields at a level, a tensor's shape of too many dimensions), or None.
    Walks the request, its Batch and their Tensors; a malformed wire is protobuf's to report."""
    try:
        for num, wire, _, a, b in _fields(buf, start, len(buf) if end is None else end):
            f = desc.fields_by_number.get(num)
            kind = f.message_type if f is not None else None
            if kind is pb.Batch.DESCRIPTOR and wire == _wire.LEN:
                if problem := _oversized(buf, kind, a, b):
                    return problem
            elif kind is pb.Tensor.DESCRIPTOR and wire == _wire.LEN:
                shape = sum(e - d for n, _, _, d, e in _fields(buf, a, b) if n == 2)
                if shape > MAX_SHAPE_BYTES:
                    return f"tensor {f.name}: a shape of more than 16 dimensions ({shape} bytes)"
    except _TooManyFields as e:
        return str(e)
    except (ValueError, IndexError):  # malformed (a varint cut off at the end): protobuf says how
        return None
    return None


def _batch_views(data: bytes, batch_field: int) -> tuple[dict[str, memoryview], bytes | None]:
    """(views, stripped): the views of `Received`, and the message without the viewed
    tensors' `data` fields (None if none), for protobuf to parse: it copies every bytes field
    it parses, ~20 ms for the 200 MB of a 16M-token request."""
    try:
        buf = memoryview(data)
        top = _once(buf, 0, len(buf)).get(batch_field)
        if top is None or top[0] != _wire.LEN:
            return {}, None
        out: dict[str, memoryview] = {}
        for num, where in _once(buf, top[1], top[2]).items():
            name = _BATCH_NAMES.get(num)
            if name is None or where is None or where[0] != _wire.LEN:
                continue
            d = _once(buf, where[1], where[2])
            if 3 not in d:
                out[name] = memoryview(b"")
            elif d[3] is not None and d[3][0] == _wire.LEN:
                out[name] = buf[d[3][1] : d[3][2]]
        if not any(v.nbytes for v in out.values()):
            return out, None
        return out, _without_data(buf, batch_field, top[1], top[2], {n for n, v in out.items() if v.nbytes})
    except Exception:  # anything unusual: read the parsed message instead
        return {}, None


def _without_data(buf: memoryview, batch_field: int, start: int, end: int, names: set[str]) -> bytes:
    """The message in `buf` (its Batch field's value at [start, end)) with the `data` field of
    the Batch tensors `names` left out (their length prefixes re-encoded); every other byte as
    it was."""

    def header(num: int, body: bytes | bytearray) -> bytes:
        return _wire.tag(num, _wire.LEN) + _wire.varint(len(body))

    body = bytearray()
    for num, wire, f0, a, b in _wire.fields(buf, start, end):
        if _BATCH_NAMES.get(num) in names and wire == _wire.LEN:
            t = bytearray()
            for n2, _, g0, _, e in _wire.fields(buf, a, b):
                if n2 != 3:
                    t += buf[g0:e]
            body += header(num, t) + t
        else:
            body += buf[f0:b]
    out = bytearray()
    for num, wire, f0, _, b in _wire.fields(buf, 0, len(buf)):
        out += header(num, body) + body if num == batch_field and wire == _wire.LEN else buf[f0:b]
    return bytes(out)


def _parse_stripped(cls: Any, stripped: bytes, batch_field: int, views: dict[str, memoryview]) -> Any:
    """The message parsed from `stripped` (see `_batch_views`), or None when a stripped
    tensor does not say its length in a 1-D `shape` (its length would then be unknown to
    the limits) or the bytes do not parse: the caller parses the whole message instead."""
    try:
        msg = cls.FromString(stripped)
    except Exception:
        return None
    batch = getattr(msg, cls.DESCRIPTOR.fields_by_number[batch_field].name)
    for name, view in views.items():
        if view.nbytes and len(getattr(batch, name).shape) != 1:
            return None
    return msg


# ---------------------------------------------------------------- tensors


def element_count(t: pb.Tensor, name: str, v: list[FieldViolation], nbytes: int | None = None) -> int | None:
    """The element count a tensor message claims, checked against its bytes (`nbytes`: their
    number when the caller has them already); None if bad.

    Pure arithmetic on the message: nothing is allocated, so an absurd shape costs nothing."""
    itemsize = _ITEMSIZE.get(t.dtype)
    if itemsize is None:
        known = ", ".join(pb.Dtype.Name(k) for k in DTYPES)
        if t.dtype == pb.DTYPE_UNSPECIFIED:
            v.append(FieldViolation(name, f"bad_dtype: dtype is unset; one of {known}"))
        else:  # (a newer client's dtype, as every other enum's unknown value; an audit)
            v.append(
                FieldViolation(
                    name, f"unknown_name: dtype {t.dtype} is not in this server's Dtype; one of {known}"
                )
            )
        return None
    if nbytes is None:
        nbytes = len(t.data)
    if nbytes % itemsize:
        v.append(
            FieldViolation(
                name,
                f"bad_length: {nbytes} bytes is not a multiple of the {itemsize}-byte "
                f"{pb.Dtype.Name(t.dtype)} element size",
            )
        )
        return None
    have = nbytes // itemsize
    if len(t.shape) == 0:
        return have
    if len(t.shape) > 8:
        v.append(FieldViolation(name, f"bad_shape: {len(t.shape)} dimensions; every tensor here is 1-D"))
        return None
    claimed = span = 1  # span: what torch's strides multiply (a 0 dimension counts as 1)
    for d in t.shape:
        if d < 0:
            v.append(FieldViolation(name, f"bad_shape: negative dimension {d} in shape {list(t.shape)}"))
            return None
        claimed *= d
        span *= max(d, 1)
        if span > ABSURD_ELEMENTS:
            why = f"bad_shape: shape {list(t.shape)} is absurd: its dimensions multiply past 2**50"
            v.append(FieldViolation(name, why))
            return None
    if claimed != have:
        v.append(
            FieldViolation(
                name,
                f"shape_mismatch: shape {list(t.shape)} needs {claimed} elements = {claimed * itemsize} bytes, "
                f"got {nbytes} bytes",
            )
        )
        return None
    return claimed


def decode_tensor(
    t: pb.Tensor, name: str, v: list[FieldViolation], data: bytes | memoryview | None = None
) -> Tensor | None:
    """A CPU torch tensor holding the message's elements (`data`: the tensor's bytes when the
    caller has a view of them, see `Received`): one copy, or none (`_tensor_over`)."""
    if UnknownFieldSet(t):  # (a newer contract's field may change how `data` reads: refused)
        unknown_fields(t, name, v, deep=False)
        return None
    if data is None:
        data = t.data  # (a copy with upb: read once)
    n = element_count(t, name, v, len(data))
    if n is None:
        return None
    dtype = DTYPES[t.dtype]
    shape = tuple(t.shape) if len(t.shape) else (n,)
    if dtype is torch.bool:
        raw = _tensor_over(data, torch.uint8, n)
        if n and bool((raw > 1).any()):
            idx = int(torch.nonzero(raw > 1)[0, 0])
            v.append(
                FieldViolation(
                    name, f"bad_bool: BOOL elements must be bytes 0 or 1, got {int(raw[idx])}", idx
                )
            )
            return None
        out = raw.view(torch.bool)
    else:
        out = _tensor_over(data, dtype, n)
    return out if len(shape) == 1 else out.reshape(shape)  # (1-D: already that shape)


# a received tensor whose bytes start on such a boundary is used in place (see _tensor_over)
SHARE_ALIGN = 16
# ... over the request's immutable bytes, which torch warns about once: nothing writes to them
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)


def _tensor_over(data: bytes | memoryview, dtype: torch.dtype, n: int) -> Tensor:
    """The n elements of `data` as a tensor. `data` whose bytes are SHARE_ALIGN-aligned is
    used in place: a view into a large received request (see `Received`; the Python client
    aligns its tensors), or the bytes protobuf gave for a small one's field (its own copy).
    No copy then, and the bytes live as long as the tensor. Such a tensor is read-only in
    fact: nothing on the server writes into a request's tensors (tested). Unaligned `data`
    is copied (`_copy_bytes`), so compiled kernels always see aligned inputs."""
    if n and _LITTLE:
        t = torch.frombuffer(data, dtype=dtype, count=n)
        if t.data_ptr() % SHARE_ALIGN == 0:
            return t
    return _copy_bytes(data, dtype, n)


def _copy_bytes(data: bytes | memoryview, dtype: torch.dtype, n: int) -> Tensor:
    """A writable tensor over a private copy of `data` (n elements): one memcpy into a
    bytearray that the tensor keeps alive (3x cheaper for small tensors than torch.empty +
    a numpy assignment; the same for large ones)."""
    if not n:
        return torch.empty(0, dtype=dtype)
    out = torch.frombuffer(bytearray(data), dtype=dtype)
    if not _LITTLE and out.element_size() > 1:  # pragma: no cover - big-endian hosts
        out = torch.from_numpy(out.view(torch.uint8).numpy().view(f"<u{out.element_size()}").byteswap()).view(
            dtype
        )
    return out


def encode_tensor(x: Tensor, out: pb.Tensor | None = None) -> pb.Tensor:
    """Raw little-endian bytes of a tensor (moved to the CPU; one copy)."""
    x = to_host([x])[0].contiguous()
    msg = out if out is not None else pb.Tensor()
    msg.dtype = TORCH_TO_PB[x.dtype]
    msg.shape[:] = list(x.shape)
    if x.dtype is torch.bool:
        x = x.view(torch.uint8)
    arr = x.view(torch.uint8).numpy() if x.dim() else x.reshape(1).view(torch.uint8).numpy()
    if not _LITTLE and x.element_size() > 1:  # pragma: no cover - big-endian hosts
        arr = x.numpy().astype(x.numpy().dtype.newbyteorder("<")).view(np.uint8)
    msg.data = arr.tobytes()
    return msg


def claimed_rows(t: pb.Tensor) -> int:
    """Best-effort length of the first dimension (rewards [B, K]: B), for accounting and limits."""
    return max(int(t.shape[0]), 0) if len(t.shape) > 1 else claimed_elements(t)


def stored_elements(t: pb.Tensor) -> int:
    """The elements a tensor's bytes hold, whatever its shape claims (0 for an unknown dtype)."""
    itemsize = _ITEMSIZE.get(t.dtype)
    return len(t.data) // itemsize if itemsize else 0


def claimed_elements(t: pb.Tensor) -> int:
    """Best-effort element count for accounting and limits (0 if malformed)."""
    if len(t.shape) == 1 and t.dtype in _ITEMSIZE:
        return max(int(t.shape[0]), 0)
    return stored_elements(t)


# ---------------------------------------------------------------- batches


def chunk_itemsize(b: pb.Batch) -> int:
    """The bytes of one float the engine computes `b` in, from its dtypes alone (its bytes
    unread): 8 when a log-prob tensor or the advantages are FLOAT64 (validation.compute_dtype)."""
    wide = (b.logp, b.old_logp, b.ref_logp, b.rollout_logp, b.advantages)
    return 8 if any(t.dtype == pb.DTYPE_FLOAT64 for t in wide) else 4


def check_batch_limits(
    b: pb.Batch,
    prefix: str,
    limits: Limits,
    v: list[FieldViolation],
    tokens_before: int = 0,
    seqs_before: int = 0,
) -> tuple[int, int]:
    """Tokens and sequences the batch claims; violations if over the limits (with what came before)."""
    n = claimed_elements(b.logp) if b.HasField("logp") else 0
    s = max(claimed_elements(b.offsets) - 1, 0) if b.HasField("offsets") else 0
    if limits.max_tokens and tokens_before + n > limits.max_tokens:
        v.append(
            FieldViolation(
                f"{prefix}logp",
                f"too_large: {tokens_before + n} tokens exceed this server's max_tokens {limits.max_tokens}; "
                "split the batch",
            )
        )
    if limits.max_sequences and seqs_before + s > limits.max_sequences:
        v.append(
            FieldViolation(
                f"{prefix}offsets",
                f"too_large: {seqs_before + s} sequences exceed this server's max_sequences {limits.max_sequences}; "
                "split the batch",
            )
        )
    return n, s


def decode_batch(
    b: pb.Batch, prefix: str, v: list[FieldViolation], views: Mapping[str, memoryview] | None = None
) -> Batch | None:
    """An engine Batch from the message; None (with violations added) if a tensor is malformed.
    `views`: tensor name -> its bytes on the wire (`Received.views`), read instead of the message.

    Semantic checks (lengths, offsets, finiteness, dtypes the engine refuses) are the engine's."""
    got: dict[str, Tensor | None] = {}
    before = len(v)
    views = views or {}
    for name in BATCH_TENSORS:
        got[name] = (
            decode_tensor(getattr(b, name), prefix + name, v, views.get(name)) if b.HasField(name) else None
        )
    if got["logp"] is None and b.HasField("logp") is False:
        v.append(FieldViolation(prefix + "logp", "missing: logp is required"))
    if got["offsets"] is None and b.HasField("offsets") is False:
        v.append(FieldViolation(prefix + "offsets", "missing: offsets (int64, length B+1) are required"))
    level = None
    if b.advantage_level == pb.ADVANTAGE_LEVEL_SEQUENCE:
        level = "sequence"
    elif b.advantage_level == pb.ADVANTAGE_LEVEL_TOKEN:
        level = "token"
    elif b.advantage_level != pb.ADVANTAGE_LEVEL_UNSPECIFIED:
        v.append(FieldViolation(prefix + "advantage_level", f"unknown_name: value {b.advantage_level}"))
    lp = got["logp"]
    for name in SAME_DTYPE_AS_LOGP:  # the contract: outputs come back in logp's dtype
        t = got[name]
        if lp is not None and t is not None and lp.dtype != t.dtype and {lp.dtype, t.dtype} <= _FLOAT_DTYPES:
            v.append(
                FieldViolation(
                    prefix + name,
                    f"bad_dtype: {pb.Dtype.Name(TORCH_TO_PB[t.dtype])}; every float tensor of the batch "
                    f"must have logp's dtype, {pb.Dtype.Name(TORCH_TO_PB[lp.dtype])}",
                )
            )
    if len(v) > before:
        return None
    assert got["logp"] is not None and got["offsets"] is not None
    return Batch(
        logp=got["logp"],
        offsets=got["offsets"],
        old_logp=got["old_logp"],
        mask=got["mask"],
        ref_logp=got["ref_logp"],
        rollout_logp=got["rollout_logp"],
        rewards=got["rewards"],
        group_ids=got["group_ids"],
        advantages=got["advantages"],
        advantage_level=level,
        sum_pi_squared=got["sum_pi_squared"],
    )


def check_groups(batch: Batch, limits: Limits, field: str, v: list[FieldViolation]) -> None:
    """A too_large violation when the batch's group ids hold more than `limits.max_groups`
    distinct values. Group ids beside advantages are unused, so not counted (the engine checks
    their dtype and length)."""
    g = batch.group_ids
    if batch.advantages is not None:
        return
    if limits.max_groups and g is not None and g.numel() > limits.max_groups and g.dim() == 1:
        if g.dtype.is_floating_point or g.dtype is torch.bool:
            return  # the engine refuses the dtype
        k = int(torch.unique(g).numel())
        if k > limits.max_groups:
            v.append(
                FieldViolation(
                    field, f"too_large: {k} groups exceed this server's max_groups {limits.max_groups}"
                )
            )


# ---------------------------------------------------------------- unknown fields


def unknown_fields(msg: Any, prefix: str, v: list[FieldViolation], *, deep: bool = True) -> None:
    """A violation for each field of `msg` that this server's softgate.v1 does not know (a
    client built from a newer contract asked for something): refused, never silently ignored,
    since ignoring a new objective or option would compute another loss. `deep`: also in
    `msg`'s set message fields (not Tensors: `decode_tensor` checks each one it reads)."""
    for f in UnknownFieldSet(msg):
        known = msg.DESCRIPTOR.fields_by_number.get(f.field_number)
        if known is not None:  # protobuf keeps a known field sent with another wire type unknown
            v.append(
                FieldViolation(
                    f"{prefix}{known.name}"
                    if prefix.endswith(".") or not prefix
                    else f"{prefix}.{known.name}",
                    f"bad_protobuf: field {f.field_number} ({known.name}) is {_type_name(known)}, "
                    f"read from wire type {_wire_types(known)}; got wire type {f.wire_type}",
                )
            )
            continue
        v.append(
            FieldViolation(
                prefix.rstrip(".") or "request",
                f"unknown_name: field number {f.field_number} of {msg.DESCRIPTOR.full_name} is not in "
                "this server's softgate.v1 (a newer client's?); upgrade the server or leave it unset",
            )
        )
    if deep:
        for fd, value in msg.ListFields():
            if fd.message_type is None or fd.message_type is pb.Tensor.DESCRIPTOR:
                continue
            if fd.is_repeated:  # (LossConfig.rejection; the first items only: more are refused by count)
                items = value.values() if isinstance(value, Mapping) else value
                for i, item in enumerate(itertools.islice(items, MAX_REPEATED_SCANNED)):
                    if not isinstance(item, (bool, int, float, str, bytes)):
                        unknown_fields(item, f"{prefix}{fd.name}[{i}].", v)
            else:
                unknown_fields(value, f"{prefix}{fd.name}.", v)


def _type_name(fd: Any) -> str:
    """A field's proto type as the .proto spells it (double, int64, Tensor, ...)."""
    if fd.message_type is not None:
        return str(fd.message_type.name)
    if fd.enum_type is not None:
        return str(fd.enum_type.name)
    names = {v: k[len("TYPE_") :].lower() for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")}
    return names.get(fd.type, "?")


def _wire_types(fd: Any) -> str:
    """The protobuf wire type(s) a field is read from: 0 varint, 1 64-bit, 2 length-delimited,
    5 32-bit (a repeated scalar also packed, 2)."""
    fixed64 = (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED64)
    fixed32 = (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_SFIXED32)
    delimited = (FieldDescriptor.TYPE_STRING, FieldDescriptor.TYPE_BYTES, FieldDescriptor.TYPE_MESSAGE)
    wire = 1 if fd.type in fixed64 else 5 if fd.type in fixed32 else 2 if fd.type in delimited else 0
    return f"{wire} or 2 (packed)" if fd.is_repeated and wire != 2 else str(wire)


# ---------------------------------------------------------------- configs


def _set_fields(msg: Any, names: Iterable[str]) -> dict[str, Any]:
    return {n: getattr(msg, n) for n in names if msg.HasField(n)}


_OBJECTIVES: dict[str, tuple[type, tuple[str, ...]]] = {
    "sapo": (Sapo, ("tau_pos", "tau_neg")),
    "grpo": (Grpo, ("eps_low", "eps_high", "dual_clip")),
    "gspo": (Gspo, ("eps_low", "eps_high", "dual_clip")),
    "gspo_token": (GspoToken, ("eps_low", "eps_high")),
    "cispo": (Cispo, ("eps_low", "eps_high")),
    "gppo": (Gppo, ("eps_low", "eps_high")),
    "gmpo": (Gmpo, ("eps_low", "eps_high")),
    "dppo_tv": (DppoTv, ("eps_low", "eps_high", "ratio_cap")),
    "dppo_kl": (DppoKl, ("eps_low", "eps_high", "ratio_cap")),
    "clip_cov": (ClipCov, ("eps_low", "eps_high", "fraction", "cov_low", "cov_high", "seed")),
    "kl_cov": (KlCov, ("fraction", "coef")),
    "reinforce": (Reinforce, ()),
    "sapo_seq": (SapoSeq, ("tau_pos", "tau_neg")),
    "cispo_seq": (CispoSeq, ("eps_low", "eps_high")),
    "dro": (Dro, ("coef",)),
}
_ESTIMATORS = {
    pb.ADVANTAGE_ESTIMATOR_GRPO: "grpo",
    pb.ADVANTAGE_ESTIMATOR_DR_GRPO: "dr_grpo",
    pb.ADVANTAGE_ESTIMATOR_RLOO: "rloo",
    pb.ADVANTAGE_ESTIMATOR_REINFORCE_PP_BASELINE: "reinforce_pp_baseline",
    pb.ADVANTAGE_ESTIMATOR_OPO: "opo",
    pb.ADVANTAGE_ESTIMATOR_GPG: "gpg",
    pb.ADVANTAGE_ESTIMATOR_GRPO_PASSK: "grpo_passk",
    pb.ADVANTAGE_ESTIMATOR_REINFORCE_PP: "reinforce_pp",
    pb.ADVANTAGE_ESTIMATOR_GDPO: "gdpo",
    pb.ADVANTAGE_ESTIMATOR_OPTIMAL_TOKEN_BASELINE: "optimal_token_baseline",
}
_POSITIONS = {
    pb.TOKEN_POSITION_TOKEN: "token",
    pb.TOKEN_POSITION_TRAINED: "trained",
}
_SCALES = {
    pb.ADVANTAGE_SCALE_GROUP: "group",
    pb.ADVANTAGE_SCALE_BATCH: "batch",
    pb.ADVANTAGE_SCALE_NONE: "none",
    pb.ADVANTAGE_SCALE_LEAVE_ONE_OUT: "leave_one_out",
}
_AGG_MODES = {
    pb.AGGREGATION_MODE_TOKEN_MEAN: "token_mean",
    pb.AGGREGATION_MODE_SEQ_MEAN_TOKEN_MEAN: "seq_mean_token_mean",
    pb.AGGREGATION_MODE_SEQ_MEAN_TOKEN_SUM: "seq_mean_token_sum",
    pb.AGGREGATION_MODE_TOKEN_SUM_NORM: "token_sum_norm",
}
_KL = {
    pb.KL_ESTIMATOR_K1: "k1",
    pb.KL_ESTIMATOR_K2: "k2",
    pb.KL_ESTIMATOR_K3: "k3",
    pb.KL_ESTIMATOR_K1_ST: "k1_st",
    pb.KL_ESTIMATOR_K3_ST: "k3_st",
    pb.KL_ESTIMATOR_K3_IS: "k3_is",
    pb.KL_ESTIMATOR_K3_IS_SEQ: "k3_is_seq",
    pb.KL_ESTIMATOR_ABS: "abs",
    pb.KL_ESTIMATOR_ABS_ST: "abs_st",
}
_KL_WEIGHTS = {
    pb.KL_WEIGHT_NONE: "none",
    pb.KL_WEIGHT_RATIO: "ratio",
    pb.KL_WEIGHT_SAMPLER_RATIO: "sampler_ratio",
    pb.KL_WEIGHT_SCORE: "score",
}
_MM_LEVELS = {
    pb.MISMATCH_LEVEL_TOKEN: "token",
    pb.MISMATCH_LEVEL_SEQUENCE: "sequence",
    pb.MISMATCH_LEVEL_GEOMETRIC: "geometric",
}
_RK_LEVELS = {
    pb.REWARD_KL_LEVEL_TOKEN: "token",
    pb.REWARD_KL_LEVEL_SEQUENCE: "sequence",
    pb.REWARD_KL_LEVEL_IMMEDIATE: "immediate",
}
_MM_MODES = {
    pb.MISMATCH_MODE_TRUNCATE: "truncate",
    pb.MISMATCH_MODE_MASK: "mask",
    pb.MISMATCH_MODE_SEQ_MASK: "seq_mask",
}
_RS_STATISTICS = {
    pb.REJECTION_STATISTIC_K1: "k1",
    pb.REJECTION_STATISTIC_K2: "k2",
    pb.REJECTION_STATISTIC_K3: "k3",
    pb.REJECTION_STATISTIC_BINARY_KL: "binary_kl",
    pb.REJECTION_STATISTIC_K3_REVERSE: "k3_reverse",
}
_OPSM_REFERENCES = {
    pb.OFF_POLICY_MASK_REFERENCE_ROLLOUT: "rollout",
    pb.OFF_POLICY_MASK_REFERENCE_OLD: "old",
}
_RS_LEVELS = {
    pb.REJECTION_LEVEL_TOKEN: "token",
    pb.REJECTION_LEVEL_SEQ_SUM: "seq_sum",
    pb.REJECTION_LEVEL_SEQ_MEAN: "seq_mean",
    pb.REJECTION_LEVEL_SEQ_MAX: "seq_max",
    pb.REJECTION_LEVEL_SEQ_MIN: "seq_min",
}


def _enum(
    value: int, table: Mapping[Any, str], field: str, v: list[FieldViolation], kw: dict[str, Any], key: str
) -> None:
    if value == 0:
        return
    if value in table:
        kw[key] = table[value]
    else:
        v.append(FieldViolation(field, f"unknown_name: enum value {value}; known: {sorted(table.values())}"))


def decode_advantage_config(msg: pb.AdvantageConfig, prefix: str, v: list[FieldViolation]) -> AdvantageConfig:
    kw: dict[str, Any] = _set_fields(msg, ("eps", "min_group_std", "gamma"))
    n = len(msg.reward_weights)
    if n > MAX_REWARD_COMPONENTS:  # (before a tuple of them: a config is cached by its bytes)
        why = f"out_of_range: {n} weights; at most {MAX_REWARD_COMPONENTS} components"
        v.append(FieldViolation(prefix + "reward_weights", why))
    elif n:  # (empty: unset, 1 each)
        kw["reward_weights"] = tuple(msg.reward_weights)
    if msg.skip_nan_components:
        kw["skip_nan_components"] = True
    if msg.zero_tail:
        kw["zero_tail"] = True
    _enum(msg.estimator, _ESTIMATORS, prefix + "estimator", v, kw, "estimator")
    _enum(msg.position, _POSITIONS, prefix + "position", v, kw, "position")
    _enum(msg.scale, _SCALES, prefix + "scale", v, kw, "scale")
    return AdvantageConfig(**kw)


# decoded configurations by their bytes: a trainer sends the same one with every request
_CONFIGS: dict[tuple[bytes, str], tuple[LossConfig, tuple[FieldViolation, ...]]] = {}
_CONFIGS_MAX = 256
_CONFIG_CACHED_BYTES = 4096  # a LossConfig with every field set is ~300 bytes
MAX_REPEATED_SCANNED = 64  # items of a repeated message field read for unknown fields


def decode_loss_config(msg: pb.LossConfig, v: list[FieldViolation], prefix: str = "config.") -> LossConfig:
    """The engine's LossConfig of `msg`; its violations (unknown enum values) appended to `v`.
    Decoded once per distinct message: the same LossConfig object comes back, which
    validation.validate_config then checks only once too (~40 us a request less)."""
    key = (msg.SerializeToString(deterministic=True), prefix)
    hit = _CONFIGS.get(key)
    if hit is None:
        found: list[FieldViolation] = []
        hit = (_decode_loss_config(msg, found, prefix), tuple(found))
        # a refused or outsized one is not kept: 256 of them held megabytes each (an audit)
        if not found and len(key[0]) <= _CONFIG_CACHED_BYTES:
            if len(_CONFIGS) >= _CONFIGS_MAX:
                _CONFIGS.clear()
            _CONFIGS[key] = hit
    v.extend(hit[1])
    return hit[0]


def _decode_loss_config(msg: pb.LossConfig, v: list[FieldViolation], prefix: str) -> LossConfig:
    unknown_fields(msg, prefix, v)  # (an Objective of a newer kind: else read as unset, SAPO)
    kind = msg.objective.WhichOneof("kind") if msg.HasField("objective") else None
    if kind is None:
        objective: Any = Sapo()
    else:
        cls, names = _OBJECTIVES[kind]
        objective = cls(**_set_fields(getattr(msg.objective, kind), names))
    adv = decode_advantage_config(msg.advantages, prefix + "advantages.", v)
    agg_kw = _set_fields(msg.aggregation, ("num_tokens", "num_seqs", "constant"))
    _enum(msg.aggregation.mode, _AGG_MODES, prefix + "aggregation.mode", v, agg_kw, "mode")
    kl = _section(
        msg,
        "kl",
        ("beta", "value_clamp"),
        {"estimator": _KL, "aggregation": _AGG_MODES, "weight": _KL_WEIGHTS},
        prefix,
        v,
    )
    mm = _section(
        msg, "mismatch", ("cap", "lo", "hi", "floor"), {"level": _MM_LEVELS, "mode": _MM_MODES}, prefix, v
    )
    if mm is not None:
        mm["batch_normalize"] = msg.mismatch.batch_normalize
    rk = _section(
        msg, "reward_kl", ("beta", "value_clamp"), {"estimator": _KL, "level": _RK_LEVELS}, prefix, v
    )
    top = _set_fields(msg, ("log_ratio_clamp", "saturation_threshold", "off_policy_mask_threshold"))
    _enum(
        msg.off_policy_mask_reference,
        _OPSM_REFERENCES,
        prefix + "off_policy_mask_reference",
        v,
        top,
        "off_policy_mask_reference",
    )
    return LossConfig(
        objective=objective,
        advantages=adv,
        aggregation=AggregationConfig(**agg_kw),
        kl=None if kl is None else KLConfig(**kl),
        mismatch=None if mm is None else MismatchConfig(**mm),
        rejection=_rejection(msg, prefix + "rejection", v),
        reward_kl=None if rk is None else RewardKLConfig(**rk),
        **top,
    )


def _section(
    msg: pb.LossConfig,
    name: str,
    numbers: tuple[str, ...],
    enums: Mapping[str, Mapping[Any, str]],
    prefix: str,
    v: list[FieldViolation],
) -> dict[str, Any] | None:
    """The keyword arguments of LossConfig's sub-message `name` (None when unset): its numbers
    that are set and its enums that are not UNSPECIFIED (an unknown value appended to `v`)."""
    if not msg.HasField(name):
        return None
    sub = getattr(msg, name)
    kw = _set_fields(sub, numbers)
    for field, table in enums.items():
        _enum(getattr(sub, field), table, f"{prefix}{name}.{field}", v, kw, field)
    return kw


def _rejection(msg: pb.LossConfig, field: str, v: list[FieldViolation]) -> tuple[RejectionCriterion, ...]:
    """LossConfig.rejection's criteria (refused past MAX_REJECTION_CRITERIA before any is built)."""
    if len(msg.rejection) > MAX_REJECTION_CRITERIA:
        v.append(
            FieldViolation(
                field, f"out_of_range: {len(msg.rejection)} criteria; at most {MAX_REJECTION_CRITERIA}"
            )
        )
        return ()
    out = []
    for i, c in enumerate(msg.rejection):
        kw = _set_fields(c, ("upper", "lower"))
        _enum(c.statistic, _RS_STATISTICS, f"{field}[{i}].statistic", v, kw, "statistic")
        _enum(c.level, _RS_LEVELS, f"{field}[{i}].level", v, kw, "level")
        out.append(RejectionCriterion(**kw))
    return tuple(out)


def selected_outputs(sel: pb.OutputSelection | None) -> tuple[str, ...]:
    """The per-token outputs a request asked for (the gradient unless explicitly refused)."""
    if sel is None:
        return ("gradient",)
    out = []
    if not sel.HasField("gradient") or sel.gradient:
        out.append("gradient")
    out += [name for name in OUTPUT_FIELDS[1:] if getattr(sel, name)]
    return tuple(out)


# ---------------------------------------------------------------- results


def fill_outputs(
    dst: pb.TokenOutputs, result: LossResult, names: tuple[str, ...], start: int = 0, stop: int | None = None
) -> None:
    for name in names:
        x = getattr(result, _RESULT_ATTR[name])
        if start or stop is not None:
            x = x[start:stop]
        encode_tensor(x, getattr(dst, name))


_OUTPUT_NUMBERS = {name: num for num, name in _wire.TOKEN_OUTPUT_FIELDS.items()}


def encode_outputs(
    field: int, result: LossResult, names: tuple[str, ...], start: int = 0, stop: int | None = None
) -> _wire.Pieces:
    """Wire pieces of the TokenOutputs field `field` holding `names` of a host result (sliced
    [start, stop)), referencing the tensors' memory: the caller's join is the one copy.
    No names: no field (as `fill_outputs` leaves it unset)."""
    out = _wire.Pieces()
    if not names:
        return out
    body = _wire.Pieces()
    for name in sorted(names, key=_OUTPUT_NUMBERS.__getitem__):
        x = getattr(result, _RESULT_ATTR[name])
        if start or stop is not None:
            x = x[start:stop]
        body.add_tensor(_OUTPUT_NUMBERS[name], x.detach().reshape(-1).numpy())
    out.submessage(field, body)
    return out


def encode_loss_response(result: LossResult, host: LossResult, names: tuple[str, ...]) -> Encoded:
    """The ComputeLossResponse of `result` as wire bytes, per-token outputs from `host`
    (what `fill_outputs` + SerializeToString give, with one copy of each tensor instead of four)."""
    return Encoded(b"".join([loss_fields(result), *encode_outputs(5, host, names).parts]))


# metric names -> (a struct of ComputeLossResponse's fields 1-4, its arguments with 0.0 for
# every value): fields 1-3 (loss, policy_loss, kl_loss) and the metrics map (4) in one pack,
# not a protobuf message built and serialised (~15 us a small request). The names are the
# engine's METRIC_NAMES in every response, so this holds one entry.
_LOSS_FIELDS: dict[tuple[str, ...], tuple[struct.Struct, list[Any]]] = {}


def _loss_packer(names: tuple[str, ...]) -> tuple[struct.Struct, list[Any]]:
    hit = _LOSS_FIELDS.get(names)
    if hit is None:
        heads = [_wire.tag(num, _wire.I64) for num in (1, 2, 3)]  # each a double after its head
        for name in names:
            key = str(name).encode()
            entry = _wire.tag(1, _wire.LEN) + _wire.varint(len(key)) + key + _wire.tag(2, _wire.I64)
            heads.append(_wire.tag(4, _wire.LEN) + _wire.varint(len(entry) + 8) + entry)
        packer = struct.Struct("<" + "".join(f"{len(h)}sd" for h in heads))
        if len(_LOSS_FIELDS) >= 8:
            _LOSS_FIELDS.clear()
        hit = _LOSS_FIELDS[names] = (packer, [x for h in heads for x in (h, 0.0)])
    return hit


def loss_fields_size(names: tuple[str, ...]) -> int:
    """The length of `loss_fields` for a result whose metrics are `names`."""
    return _loss_packer(names)[0].size


def loss_fields(result: LossResult) -> bytes:
    """Wire bytes of ComputeLossResponse's loss, policy_loss, kl_loss and metrics for `result`
    (every field written, zeros too: what a parser reads is the same)."""
    packer, args = _loss_packer(tuple(result.metrics))
    args = args.copy()
    args[1::2] = (result.loss, result.policy_loss, result.kl_loss, *result.metrics.values())
    return packer.pack(*args)


def host_result(result: LossResult, names: tuple[str, ...]) -> LossResult:
    """The result with the requested per-token tensors moved to the CPU once."""
    import dataclasses

    attrs = [_RESULT_ATTR[n] for n in names]
    if all(getattr(result, a).device.type == "cpu" for a in attrs):  # the CPU engine's: nothing to move
        return result
    moved: dict[str, Any] = dict(zip(attrs, to_host([getattr(result, a) for a in attrs]), strict=True))
    return dataclasses.replace(result, **moved)


def metrics_map(metrics: dict[str, Any]) -> dict[str, float]:
    return {str(k): float(x) for k, x in metrics.items()}


# ---------------------------------------------------------------- engine field names -> request fields


def request_field(engine_field: str, *, batch_prefix: str = "batch.", config_prefix: str = "config.") -> str:
    if engine_field == "batch":  # the batch as a whole (its loss overflowed)
        return batch_prefix.rstrip(".")
    root = engine_field.split(".", 1)[0].split("[", 1)[0]
    if root == "advantages" and "." not in engine_field:
        return batch_prefix + engine_field  # the tensor, not the AdvantageConfig
    if root in CONFIG_ROOTS:
        return config_prefix + engine_field
    return batch_prefix + engine_field


def rename(err: InputError, fn: Any) -> InputError:
    """The same violations with `fn(FieldViolation) -> FieldViolation` applied, and the torch
    dtype names of their reasons in softgate.v1's (`contract_dtypes`)."""
    out = []
    for x in err.violations:
        f = fn(x)
        out.append(FieldViolation(f.field, contract_dtypes(f.reason), f.index) if "torch." in f.reason else f)
    return InputError(out)


# "torch.float16" -> "DTYPE_FLOAT16": the engine's reasons name torch dtypes, a client knows the Dtype enum
_DTYPE_NAMES = {str(t): pb.Dtype.Name(k) for k, t in DTYPES.items()}
_TORCH_DTYPE = re.compile(r"torch\.\w+")


def contract_dtypes(reason: str) -> str:
    """`reason` with each torch dtype name replaced by softgate.v1's (a name it lacks stays)."""
    return _TORCH_DTYPE.sub(lambda m: _DTYPE_NAMES.get(m.group(0), m.group(0)), reason)
