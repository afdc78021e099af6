"""Protobuf wire encoding of the big messages without intermediate copies.

The token arrays are most of every request and response. Through the generated classes each
one is copied three times on the way out (`tobytes`, into the message, `SerializeToString`)
and twice on the way in (parse, `.data`). Here a request is a list of byte pieces: small
headers encoded by hand (and the small config / output-selection messages serialised by
protobuf), and each array's memory as a memoryview; gRPC's serializer joins them, the one copy.
A response is walked field by field: the small fields are parsed by protobuf, each Tensor's
`data` becomes a zero-copy numpy view of the received bytes.

The encoding is standard proto3 (the same bytes as the generated classes up to field order,
which protobuf parsers accept in any order); tests check it against the generated classes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

LEN = 2  # wire type of length-delimited fields
VARINT = 0
I64 = 1
I32 = 5

# numpy dtype -> proto Dtype value
NP_TO_DTYPE: dict[np.dtype, int] = {
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
DTYPE_TO_NP: dict[int, np.dtype] = {v: k for k, v in NP_TO_DTYPE.items()}

# Batch field numbers (softgate.proto)
BATCH_FIELDS = {
    "logp": 1,
    "offsets": 2,
    "old_logp": 3,
    "mask": 4,
    "ref_logp": 5,
    "rollout_logp": 6,
    "rewards": 7,
    "group_ids": 8,
    "advantages": 9,
    "sum_pi_squared": 11,
}
BATCH_ADVANTAGE_LEVEL = 10
TOKEN_OUTPUT_FIELDS = {
    1: "gradient",
    2: "advantages",
    3: "ratio",
    4: "gate_weight",
    5: "clip_mask",
    6: "mask",
}


_SMALL_VARINTS = [bytes((i,)) for i in range(128)]


def varint(n: int) -> bytes:
    if 0 <= n < 128:  # tags, dtypes, small lengths: most calls
        return _SMALL_VARINTS[n]
    return _varint(n)


@functools.lru_cache(maxsize=1024)  # a trainer repeats its sizes
def _varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def tag(field: int, wire: int) -> bytes:
    return varint((field << 3) | wire)


_BYTES = (bytes, bytearray)


class Pieces:
    """Byte pieces of one message, with their total length."""

    def __init__(self) -> None:
        self.parts: list[Any] = []
        self.size = 0

    def add(self, b: Any) -> None:
        self.parts.append(b)
        self.size += len(b) if isinstance(b, _BYTES) else b.nbytes

    def extend(self, other: Pieces) -> None:
        self.parts.extend(other.parts)
        self.size += other.size

    def add_tensor(self, field: int, a: np.ndarray) -> None:
        """Add Tensor field `field` holding `a`, unplaced (no padding; `tensor` places one):
        one cached header and the data. A small request's build was mostly per-piece Python."""
        data = _le_view(a)
        head = _field_head(field, a.dtype, int(a.shape[0]), data.nbytes)
        self.parts += (head, data)
        self.size += len(head) + data.nbytes

    def submessage(self, field: int, body: Pieces) -> None:
        self.add(tag(field, LEN) + varint(body.size))
        self.extend(body)

    def join(self) -> bytes:
        return b"".join(self.parts)


def _le_view(a: np.ndarray) -> memoryview:
    """The array's bytes, little-endian and contiguous, without a copy when it already is."""
    if np.little_endian and a.dtype.isnative and a.flags.c_contiguous:  # (~4 us cold, the rest ~10)
        return a.data.cast("B")
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and not np.little_endian):
        a = a.astype(a.dtype.newbyteorder("<"))
    a = np.ascontiguousarray(a)
    return a.reshape(-1).data.cast("B")


def _dtype(dtype: np.dtype) -> int:
    """The proto Dtype of a numpy dtype of either byte order."""
    dt = NP_TO_DTYPE.get(dtype.newbyteorder("="))
    if dt is None:
        raise TypeError(f"unsupported dtype {dtype}")
    return dt


def tensor(a: np.ndarray, at: int) -> Pieces:
    """A Tensor message of `a` placed at `at`: the offset in the whole serialised message where
    this Tensor's body lands; its `data` then starts at a multiple of ALIGN (Tensor.padding).
    (Unplaced: `Pieces.add_tensor`.)"""
    data = _le_view(a)
    p = Pieces()
    p.add(tensor_head(_dtype(a.dtype), int(a.shape[0]), data.nbytes, at))
    if data.nbytes:  # proto3 leaves empty bytes out (as the generated classes do)
        p.add(data)
    return p


def tensor_head(dt: int, n: int, nbytes: int, at: int) -> bytes:
    """The bytes of `tensor`'s Tensor message before its data: Dtype `dt`, shape [n], `nbytes`
    of data, placed at `at`."""
    head, data_head = _tensor_heads(dt, n, nbytes)
    if not nbytes:
        return head
    return head + _padding(at + len(head) + len(data_head)) + data_head


@functools.lru_cache(maxsize=256)
def _tensor_heads(dt: int, n: int, nbytes: int) -> tuple[bytes, bytes]:
    """A Tensor's fields before its data (dtype, shape) and its data's tag and length."""
    shape = varint(n)
    head = tag(1, VARINT) + varint(dt) + tag(2, LEN) + varint(len(shape)) + shape
    return head, tag(3, LEN) + varint(nbytes)


@functools.lru_cache(maxsize=256)
def _field_head(num: int, dtype: np.dtype, n: int, nbytes: int) -> bytes:
    """The bytes of Tensor field `num` up to its data (see Pieces.add_tensor)."""
    head, data_head = _tensor_heads(_dtype(dtype), n, nbytes)
    if not nbytes:  # proto3 leaves empty bytes out
        data_head = b""
    return tag(num, LEN) + varint(len(head) + len(data_head) + nbytes) + head + data_head


# a request's tensor data starting at a multiple of this (from the message's first byte) can
# be read in place by the server (codec.SHARE_ALIGN); the client aligns requests of at least
# ALIGN_MIN_BYTES (the server's threshold for reading a request's tensors in place)
ALIGN = 16
ALIGN_MIN_BYTES = 1 << 20
TENSOR_PADDING = 15  # Tensor.padding


def _padding(data_at: int) -> bytes:
    """A Tensor.padding field that moves data starting at offset `data_at` to a multiple of
    ALIGN (tag, length and zeros: 2 bytes at least, so a shift of 1 is one of ALIGN + 1)."""
    s = -data_at % ALIGN
    if s == 0:
        return b""
    if s == 1:
        s += ALIGN
    return tag(TENSOR_PADDING, LEN) + varint(s - 2) + bytes(s - 2)


def placed(p: Pieces, field: int, build: Callable[[int], Pieces], at: int) -> None:
    """p.submessage(field, build(body_at)) where body_at is the offset the body lands at when
    p itself starts at offset `at`. The body's length prefix has to be known to place it, and
    its length depends on the placement (padding): fixed point over the prefix's width."""
    hdr = tag(field, LEN)
    width = 1
    for _ in range(4):
        body = build(at + p.size + len(hdr) + width)
        w = len(varint(body.size))
        if w == width:
            p.submessage(field, body)
            return
        width = w
    p.submessage(
        field, body
    )  # (not reached in practice) padded for a prefix width that moved: unaligned, still valid


def batch(
    token: dict[str, np.ndarray],
    seq: dict[str, np.ndarray],
    offsets: np.ndarray,
    level: int,
    at: int | None = None,
) -> Pieces:
    """A Batch message. `at`: the offset in the whole serialised message where it lands;
    every tensor's data is then aligned (see `tensor`)."""
    arrays = {**token, **seq, "offsets": offsets}
    p = Pieces()
    for name, num in BATCH_FIELDS.items():
        a = arrays.get(name)
        if a is None:
            continue
        if at is None:
            p.add_tensor(num, a)
        else:
            placed(p, num, functools.partial(tensor, a), at)
    if level:
        p.add(tag(BATCH_ADVANTAGE_LEVEL, VARINT) + varint(level))
    return p


def message(small: dict[int, Any], big: dict[int, Pieces | Callable[[int], Pieces]]) -> Pieces:
    """A message of small protobuf sub-messages (serialised by protobuf, or already: bytes)
    and hand-built ones: Pieces, or a function of the offset at which the sub-message's body
    lands (`batch`'s `at`)."""
    p = Pieces()
    for num in sorted({*small, *big}):
        if num in small:
            m = small[num]
            if m is None:
                continue
            body = m if isinstance(m, bytes) else m.SerializeToString()
            p.add(tag(num, LEN) + varint(len(body)) + body)
        else:
            b = big[num]
            if isinstance(b, Pieces):
                p.submessage(num, b)
            else:
                placed(p, num, b, 0)
    return p


# ---------------------------------------------------------------- decoding


def read_varint(buf: memoryview, i: int) -> tuple[int, int]:
    """(the varint at `buf[i]`, the index after it); ValueError past protobuf's 10 bytes (a run
    of 0x80 bytes built an ever larger int: a 1 MiB one held a server's loop for 30 s)."""
    out = 0
    for shift in range(0, 70, 7):
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
    raise ValueError("malformed varint: longer than 10 bytes")


def fields(
    buf: memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of each field."""
    i = start
    end = len(buf) if end is None else end
    while i < end:
        f0 = i
        key, i = read_varint(buf, i)
        num, wire = key >> 3, key & 7
        if wire == VARINT:
            _, j = read_varint(buf, i)
        elif wire == I64:
            j = i + 8
        elif wire == LEN:
            n, i = read_varint(buf, i)
            j = i + n
        elif wire == I32:
            j = i + 4
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if j > end:
            raise ValueError("truncated message")
        yield num, wire, f0, i, j
        i = j


def read_tensor(buf: memoryview, start: int, end: int) -> np.ndarray:
    dtype = 0
    data: memoryview | None = None
    for num, wire, _, a, b in fields(buf, start, end):
        if num == 1 and wire == VARINT:
            dtype, _ = read_varint(buf, a)
        elif num == 3 and wire == LEN:
            data = buf[a:b]
    dt = DTYPE_TO_NP.get(dtype)
    if dt is None:
        raise ValueError(f"unexpected dtype {dtype} in a response")
    if data is None:
        return np.zeros(0, dt)
    return np.frombuffer(data, dtype=dt.newbyteorder("<"))


def read_token_outputs(buf: memoryview, start: int, end: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for num, wire, _, a, b in fields(buf, start, end):
        name = TOKEN_OUTPUT_FIELDS.get(num)
        if name is not None and wire == LEN:
            out[name] = read_tensor(buf, a, b)
    return out


# below this size a response is parsed by protobuf whole (one small copy of the outputs is
# cheaper than walking the metrics map field by field in Python)
SMALL_RESPONSE_BYTES = 1 << 20


def split_response(data: bytes, outputs_field: int, msg_cls: Any) -> tuple[Any, dict[str, np.ndarray]]:
    """Parse `data` as `msg_cls` without its `outputs_field` (TokenOutputs), which is read
    into zero-copy numpy views instead (a small response: parsed whole, outputs copied once)."""
    if len(data) < SMALL_RESPONSE_BYTES:
        msg = msg_cls.FromString(data)
        desc = msg_cls.DESCRIPTOR.fields_by_number[outputs_field]
        small: dict[str, np.ndarray] = {}
        if msg.HasField(desc.name):
            tok = getattr(msg, desc.name)
            for name in TOKEN_OUTPUT_FIELDS.values():
                if tok.HasField(name):
                    t = getattr(tok, name)
                    dt = DTYPE_TO_NP.get(t.dtype)
                    if dt is None:
                        raise ValueError(f"unexpected dtype {t.dtype} in a response")
                    small[name] = np.frombuffer(t.data, dtype=dt.newbyteorder("<"))
            msg.ClearField(desc.name)
        return msg, small
    buf = memoryview(data)
    rest: list[memoryview] = []
    outs: dict[str, np.ndarray] = {}
    for num, wire, f0, a, b in fields(buf):
        if num == outputs_field and wire == LEN:
            outs.update(read_token_outputs(buf, a, b))
        else:
            rest.append(buf[f0:b])
    return msg_cls.FromString(b"".join(rest)), outs
