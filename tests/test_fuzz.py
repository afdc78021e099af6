"""Hostile input: hypothesis-generated proto messages (random dtypes, shapes, bytes, offsets,
enum values and parameters, NaN / inf everywhere) and raw random or truncated bytes on the
wire, against a real `softgate serve` with small limits.

Every input gets either a correct answer (finite loss, gradient and metrics) or
INVALID_ARGUMENT (with a google.rpc.BadRequest) / RESOURCE_EXHAUSTED: never UNKNOWN or
INTERNAL, never a crash (the process is alive and SERVING at the end), never a hang (every
call has a deadline far above the time a refusal takes).
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from conftest import ServerProcess, grpc_health
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from softgate.engine import OBJECTIVES
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

LIMITS = {"max_tokens": 1 << 14, "max_sequences": 1024, "max_groups": 256, "max_message_bytes": 1 << 20}
ALLOWED = {"OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"}
CALL_TIMEOUT = 20.0
_ident = lambda b: b  # noqa: E731

# SOFTGATE_FUZZ_EXAMPLES=N: N fresh random examples a test instead of the same 120 everywhere
# (a long hunt: 15,000 a test takes ~15 min with `--timeout 0`; see docs/reliability.md)
EXAMPLES = os.environ.get("SOFTGATE_FUZZ_EXAMPLES")
FUZZ = settings(
    max_examples=int(EXAMPLES) if EXAMPLES else 120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    derandomize=not EXAMPLES,
    database=None,  # the same examples on every machine: no replay of a local run's finds
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    sp = ServerProcess(settings=dict(LIMITS), log_path=tmp_path_factory.mktemp("fuzz") / "server.log")
    sp.start()
    yield sp
    if os.environ.get("SOFTGATE_FUZZ_REPORT"):
        print("\nfuzz outcomes:", dict(sorted(OUTCOMES.items())))
    alive = sp.proc is not None and sp.proc.poll() is None
    logs = sp.logs()
    sp.stop()
    assert alive, f"the server died during fuzzing:\n{logs[-3000:]}"


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    ch = server.channel()
    yield ch
    assert grpc_health(ch) == "SERVING"
    ch.close()


# ---------------------------------------------------------------- checking a reply


def _finite_tensor(t: pb.Tensor) -> bool:
    np_dt = {pb.DTYPE_FLOAT32: "<f4", pb.DTYPE_FLOAT64: "<f8"}.get(t.dtype)
    if np_dt is None:
        return True
    return bool(np.all(np.isfinite(np.frombuffer(t.data, np_dt))))


OUTCOMES: Counter[str] = Counter()  # status codes seen, for the record (docs/reliability.md)


def check_outcome(call: Any, kind: str) -> str:
    """Run `call()` (returns serialised reply bytes or a list of them); assert the contract."""
    try:
        reply = call()
    except grpc.RpcError as e:
        code = e.code().name
        OUTCOMES[f"{kind} {code}"] += 1
        assert code in ALLOWED, f"{code}: {e.details()}"
        if code == "INVALID_ARGUMENT":
            st_ = rpc_status.from_call(e)
            assert st_ is not None, "INVALID_ARGUMENT without a google.rpc.Status"
            bad = error_details_pb2.BadRequest()
            assert any(d.Unpack(bad) for d in st_.details), "INVALID_ARGUMENT without BadRequest details"
            assert len(bad.field_violations) >= 1
        return code
    OUTCOMES[f"{kind} OK"] += 1
    if kind == "loss":
        r = pb.ComputeLossResponse.FromString(reply)
        assert np.isfinite([r.loss, r.policy_loss, r.kl_loss]).all(), r.loss
        assert all(np.isfinite(v) for v in r.metrics.values()), dict(r.metrics)
        for f in ("gradient", "advantages", "ratio", "gate_weight"):
            assert _finite_tensor(getattr(r.outputs, f)), f
    elif kind == "stream":
        rs = [pb.StreamLossResponse.FromString(b) for b in reply]
        assert rs, "an OK stream with no response"
        s = rs[-1].summary
        assert np.isfinite([s.loss, s.policy_loss, s.kl_loss]).all()
        assert all(np.isfinite(v) for v in s.metrics.values())
        assert all(_finite_tensor(r.outputs.gradient) for r in rs)
    elif kind == "advantages":
        r = pb.ComputeAdvantagesResponse.FromString(reply)
        assert _finite_tensor(r.advantages)
        assert all(np.isfinite(v) for v in r.metrics.values()), dict(r.metrics)
    return "OK"


def send_loss(ch: grpc.Channel, req: pb.ComputeLossRequest) -> str:
    f = ch.unary_unary(
        "/softgate.v1.LossService/ComputeLoss", request_serializer=_ident, response_deserializer=_ident
    )
    return check_outcome(lambda: f(req.SerializeToString(), timeout=CALL_TIMEOUT), "loss")


def send_stream(ch: grpc.Channel, msgs: list[pb.StreamLossRequest]) -> str:
    f = ch.stream_stream(
        "/softgate.v1.LossService/StreamLoss", request_serializer=_ident, response_deserializer=_ident
    )
    return check_outcome(
        lambda: list(f(iter([m.SerializeToString() for m in msgs]), timeout=CALL_TIMEOUT)), "stream"
    )


def send_advantages(ch: grpc.Channel, req: pb.ComputeAdvantagesRequest) -> str:
    f = ch.unary_unary(
        "/softgate.v1.LossService/ComputeAdvantages", request_serializer=_ident, response_deserializer=_ident
    )
    return check_outcome(lambda: f(req.SerializeToString(), timeout=CALL_TIMEOUT), "advantages")


# ---------------------------------------------------------------- strategies

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
DTYPES = [*range(0, 11), 11, 99, -3]  # every enum value plus unknown ones (proto3 enums are open)
ITEMSIZE = {1: 4, 2: 8, 3: 8, 4: 4, 5: 1, 6: 1, 7: 1, 8: 2, 9: 2, 10: 2}
NP_OF = {1: "<f4", 2: "<f8", 3: "<i8", 4: "<i4", 5: "u1", 6: "u1", 7: "i1", 8: "<i2", 9: "<f2", 10: "<u2"}

weird_ints = st.sampled_from(
    [0, 1, -1, 2, 7, 1 << 20, 10**12, 1 << 31, (1 << 32) + 1, 1 << 62, INT64_MAX, INT64_MIN]
)
dims = st.one_of(st.integers(-4, 64), weird_ints)
SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-300, 1e300, -1e300, float("nan"), float("inf"), -float("inf")]
weird_floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=64), st.sampled_from(SPECIAL))
clamps = weird_floats
log_probs = st.one_of(
    st.floats(-30.0, 0.0, width=32),
    st.sampled_from([0.0, -1e-30, -88.0, -1e30, 5.0, float("nan"), -float("inf"), float("inf")]),
)


@st.composite
def raw_tensors(draw: Any) -> pb.Tensor:
    """Anything: dtype, shape and bytes drawn independently."""
    return pb.Tensor(
        dtype=draw(st.sampled_from(DTYPES)),
        shape=draw(st.one_of(st.just([]), st.lists(dims, max_size=10))),
        data=draw(st.binary(max_size=300)),
    )


def _values_tensor(values: list[Any], dtype: int, shape: list[int] | None = None) -> pb.Tensor:
    if dtype in (1, 2, 9, 10) or not all(isinstance(x, int) for x in values):
        arr = np.asarray(values, dtype=np.float64)
        if dtype not in (1, 2, 9, 10):
            arr = np.clip(np.nan_to_num(arr), -(2.0**62), 2.0**62)
    else:
        arr = np.asarray(values, dtype=np.int64)
    with np.errstate(all="ignore"):
        if dtype == 10:  # bfloat16: the high half of float32
            data = (arr.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
        elif dtype == 5:
            data = (arr != 0).astype("u1").tobytes()
        else:
            data = arr.astype(NP_OF[dtype]).tobytes()
    return pb.Tensor(dtype=dtype, shape=[len(values)] if shape is None else shape, data=data)


@st.composite
def token_tensors(draw: Any, n: int, float_dtype: int) -> pb.Tensor:
    dtype = draw(st.sampled_from([float_dtype] * 6 + [1, 2, 3, 9, 10]))
    vals = draw(st.lists(log_probs, min_size=n, max_size=n))
    return _values_tensor(vals, dtype)


@st.composite
def offsets_tensors(draw: Any, lengths: list[int]) -> pb.Tensor:
    off = [0, *np.cumsum(lengths).tolist()]
    mutation = draw(
        st.sampled_from(["none"] * 6 + ["overflow", "negative", "first", "last", "dtype", "shape"])
    )
    if mutation == "overflow" and len(off) > 1:
        off[draw(st.integers(1, len(off) - 1))] = draw(
            st.sampled_from([INT64_MAX, INT64_MAX - 1, 1 << 62, INT64_MIN])
        )
    elif mutation == "negative" and len(off) > 2:
        i = draw(st.integers(1, len(off) - 2))
        off[i] = off[i + 1] + draw(st.integers(1, 1 << 40))
    elif mutation == "first":
        off[0] = draw(weird_ints)
    elif mutation == "last":
        off[-1] = draw(weird_ints)
    dtype = draw(st.sampled_from([3, 4, 1])) if mutation == "dtype" else 3
    shape = [draw(weird_ints)] if mutation == "shape" else None
    with np.errstate(all="ignore"):
        return _values_tensor(off, dtype, shape)


clean_log_probs = st.floats(-30.0, 0.0, width=32)


def _clean_batch(draw: Any, lengths: list[int], fdt: int, fields: frozenset[str], level: int = 0) -> pb.Batch:
    """A well-formed ragged batch carrying `fields` (beyond logp and offsets)."""
    n, b = int(sum(lengths)), len(lengths)
    msg = pb.Batch()
    msg.logp.CopyFrom(_values_tensor(draw(st.lists(clean_log_probs, min_size=n, max_size=n)), fdt))
    msg.offsets.CopyFrom(_values_tensor([0, *np.cumsum(lengths, dtype=np.int64).tolist()], 3))
    for name in ("old_logp", "ref_logp", "rollout_logp"):
        if name in fields:
            vals = draw(st.lists(clean_log_probs, min_size=n, max_size=n))
            getattr(msg, name).CopyFrom(_values_tensor(vals, fdt))
    if "mask" in fields:
        msg.mask.CopyFrom(
            _values_tensor(draw(st.lists(st.sampled_from([0, 1, 1]), min_size=n, max_size=n)), 5)
        )
    if "advantages" in fields:
        k = n if level == 2 else b
        vals = draw(st.lists(st.floats(-5, 5, width=32), min_size=k, max_size=k))
        msg.advantages.CopyFrom(_values_tensor(vals, fdt))
        msg.advantage_level = level  # type: ignore[assignment]
    else:
        msg.rewards.CopyFrom(
            _values_tensor(draw(st.lists(st.sampled_from([0.0, 1.0, 0.5]), min_size=b, max_size=b)), 1)
        )
        msg.group_ids.CopyFrom(_values_tensor(draw(st.lists(st.integers(0, 3), min_size=b, max_size=b)), 3))
    return msg


field_sets = st.frozensets(st.sampled_from(["old_logp", "ref_logp", "rollout_logp", "mask", "advantages"]))


def _break_one(draw: Any, msg: pb.Batch, lengths: list[int], fdt: int) -> None:
    """Replace one field of a batch built clean from `lengths` by a hostile value (the batch may
    already have hostile fields: `lengths` are the clean ones, not read back from the message)."""
    n, b = int(sum(lengths)), len(lengths)
    name = draw(
        st.sampled_from(
            ["logp", "offsets", "old_logp", "mask", "rewards", "group_ids", "advantages", "level"]
        )
    )
    if name == "offsets":
        msg.offsets.CopyFrom(draw(offsets_tensors(lengths)))
    elif name == "level":
        msg.advantage_level = draw(st.sampled_from([0, 1, 2, 7, -1]))  # type: ignore[assignment]
    elif name == "mask":
        mvals = draw(st.lists(st.sampled_from([0, 1, 2, -1]), min_size=n, max_size=n))
        msg.mask.CopyFrom(_values_tensor(mvals, draw(st.sampled_from([5, 6, 3, 1]))))
    elif name in ("rewards", "advantages"):
        k = draw(st.sampled_from([b, n, b + 1]))
        getattr(msg, name).CopyFrom(_values_tensor(draw(st.lists(weird_floats, min_size=k, max_size=k)), fdt))
    elif name == "group_ids":
        gvals = draw(st.lists(st.one_of(st.integers(0, 4), weird_ints), min_size=b, max_size=b))
        msg.group_ids.CopyFrom(_values_tensor(gvals, draw(st.sampled_from([3, 3, 4, 1]))))
    else:
        k = draw(st.sampled_from([n, n, n + 1, max(n - 1, 0)]))
        getattr(msg, name).CopyFrom(draw(st.one_of(token_tensors(k, fdt), raw_tensors())))


@st.composite
def batches(draw: Any, max_seqs: int = 12, max_len: int = 24) -> pb.Batch:
    """A third well-formed, a third with one hostile field, a third hostile all over."""
    lengths = draw(st.lists(st.integers(0, max_len), min_size=0, max_size=max_seqs))
    fdt = draw(st.sampled_from([1, 2]))
    fields = draw(field_sets)
    msg = _clean_batch(draw, lengths, fdt, fields, draw(st.sampled_from([0, 1, 2])))
    hostility = draw(st.integers(0, 2))
    for _ in range(hostility * draw(st.integers(1, 3))):
        _break_one(draw, msg, lengths, fdt)
    return msg


@st.composite
def stream_chunks(draw: Any) -> list[pb.Batch]:
    """The chunks of one StreamLoss call: consistent (same fields, dtype) or with one broken."""
    fdt = draw(st.sampled_from([1, 2]))
    fields = draw(field_sets)
    level = draw(st.sampled_from([1, 2]))
    out, chunk_lengths = [], []
    for _ in range(draw(st.integers(0, 4))):
        lengths = draw(st.lists(st.integers(0, 10), min_size=0, max_size=5))
        out.append(_clean_batch(draw, lengths, fdt, fields, level))
        chunk_lengths.append(lengths)
    if out and draw(st.booleans()):
        k = draw(st.integers(0, len(out) - 1))
        _break_one(draw, out[k], chunk_lengths[k], fdt)
    return out


@st.composite
def loss_configs(draw: Any) -> pb.LossConfig:
    c = pb.LossConfig()
    kind = draw(st.sampled_from([None, *OBJECTIVES]))
    if kind is not None:
        obj = getattr(c.objective, kind)
        obj.SetInParent()
        for f in obj.DESCRIPTOR.fields:
            if draw(st.booleans()):
                uint64 = f.type == f.TYPE_UINT64  # (clip_cov's seed)
                setattr(obj, f.name, draw(st.integers(0, 2**64 - 1) if uint64 else weird_floats))
    if draw(st.booleans()):
        c.advantages.estimator = draw(st.integers(0, 10))  # (10: one past the last, GDPO)
        c.advantages.scale = draw(st.integers(0, 4))
        if draw(st.booleans()):
            c.advantages.eps = draw(weird_floats)
        if draw(st.booleans()):
            c.advantages.min_group_std = draw(weird_floats)
        if draw(st.booleans()):  # (REINFORCE_PP's discount: in [0, 1] half the time)
            c.advantages.gamma = draw(st.one_of(st.floats(0.0, 1.0), weird_floats))
    if draw(st.booleans()):
        c.aggregation.mode = draw(st.integers(0, 5))
        for f in ("num_tokens", "num_seqs", "constant"):
            if draw(st.booleans()):
                setattr(c.aggregation, f, draw(weird_floats))
    if draw(st.booleans()):
        c.kl.SetInParent()
        c.kl.estimator = draw(st.integers(0, 9))  # (9: one past the last, ABS_ST)
        if draw(st.booleans()):
            c.kl.beta = draw(weird_floats)
        if draw(st.booleans()):
            c.kl.value_clamp = draw(weird_floats)
    if draw(st.booleans()):
        c.mismatch.SetInParent()
        c.mismatch.level = draw(st.integers(0, 3))
        c.mismatch.mode = draw(st.integers(0, 3))
        for f in ("cap", "lo", "hi"):
            if draw(st.booleans()):
                setattr(c.mismatch, f, draw(weird_floats))
    if draw(st.booleans()):
        c.log_ratio_clamp = draw(clamps)
    if draw(st.booleans()):
        c.saturation_threshold = draw(weird_floats)
    return c


@st.composite
def output_selections(draw: Any) -> pb.OutputSelection:
    sel = pb.OutputSelection()
    for f in sel.DESCRIPTOR.fields:
        if draw(st.booleans()):
            setattr(sel, f.name, draw(st.booleans()))
    return sel


# ---------------------------------------------------------------- the fuzz tests


@FUZZ
@given(batch=batches(), config=loss_configs(), outputs=output_selections())
def test_fuzz_compute_loss(
    channel: grpc.Channel, batch: pb.Batch, config: pb.LossConfig, outputs: Any
) -> None:
    send_loss(channel, pb.ComputeLossRequest(batch=batch, config=config, outputs=outputs))


@FUZZ
@given(batch=batches(), outputs=output_selections())
def test_fuzz_compute_loss_valid_config(channel: grpc.Channel, batch: pb.Batch, outputs: Any) -> None:
    """Default configuration: most failures are the batch's; many requests succeed."""
    send_loss(channel, pb.ComputeLossRequest(batch=batch, outputs=outputs))


@FUZZ
@given(
    chunks=stream_chunks(),
    config=st.one_of(st.just(pb.LossConfig()), loss_configs()),
    config_later=st.booleans(),
)
def test_fuzz_stream_loss(
    channel: grpc.Channel, chunks: list[pb.Batch], config: pb.LossConfig, config_later: bool
) -> None:
    msgs = [pb.StreamLossRequest(chunk=c) for c in chunks]
    if msgs:
        msgs[0].config.CopyFrom(config)
        if config_later and len(msgs) > 1:
            msgs[-1].config.CopyFrom(config)
    else:
        msgs = [pb.StreamLossRequest(config=config)]  # a message without a chunk
    send_stream(channel, msgs)


@FUZZ
@given(
    clean=st.booleans(),
    rewards=raw_tensors() | st.builds(lambda v: _values_tensor(v, 2), st.lists(weird_floats, max_size=20)),
    groups=raw_tensors()
    | st.builds(lambda v: _values_tensor(v, 3), st.lists(weird_ints | st.integers(0, 3), max_size=20)),
    clean_rewards=st.lists(st.sampled_from([0.0, 1.0, 0.25, float("nan")]), min_size=6, max_size=6),
    clean_groups=st.lists(st.integers(0, 2), min_size=6, max_size=6),
    components=st.sampled_from([1, 2, 3]),
    skip_nan=st.booleans(),
    estimator=st.integers(0, 4) | st.integers(0, 10),
    scale=st.integers(0, 3) | st.integers(0, 5),
    eps=st.none() | weird_floats,
)
def test_fuzz_compute_advantages(
    channel: grpc.Channel,
    clean: bool,
    clean_rewards: list[float],
    clean_groups: list[int],
    components: int,
    skip_nan: bool,
    rewards: pb.Tensor,
    groups: pb.Tensor,
    estimator: int,
    scale: int,
    eps: float | None,
) -> None:
    if clean:  # well-formed tensors ([B] or [B, K], NaN among them): only the configuration may be hostile
        b = 6 // components
        rewards = _values_tensor(clean_rewards, 1, None if components == 1 else [b, components])
        groups = _values_tensor(clean_groups[:b], 3)
    req = pb.ComputeAdvantagesRequest(rewards=rewards, group_ids=groups)
    req.config.estimator = estimator  # type: ignore[assignment]
    req.config.scale = scale  # type: ignore[assignment]
    req.config.skip_nan_components = skip_nan
    if eps is not None:
        req.config.eps = eps
    send_advantages(channel, req)


def _valid_request() -> pb.ComputeLossRequest:
    req = pb.ComputeLossRequest()
    b = req.batch
    b.logp.CopyFrom(_values_tensor([-1.0, -0.5, -2.0, -0.1], 1))
    b.old_logp.CopyFrom(_values_tensor([-1.1, -0.4, -2.0, -0.2], 1))
    b.offsets.CopyFrom(_values_tensor([0, 2, 4], 3))
    b.rewards.CopyFrom(_values_tensor([1.0, 0.0], 1))
    b.group_ids.CopyFrom(_values_tensor([0, 0], 3))
    return req


# ---------------------------------------------------------------- raw bytes on the wire

# A request that is not valid protobuf: INVALID_ARGUMENT with a BadRequest (reason
# bad_protobuf) since fe1bbef; before it, grpcio's default deserializer answered UNKNOWN
# (unary) and StreamLoss INTERNAL (found by these tests).
METHODS = ("ComputeLoss", "ComputeAdvantages", "ListAlgorithms")


def _raw_unary(ch: grpc.Channel, method: str, payload: bytes) -> str:
    f = ch.unary_unary(
        f"/softgate.v1.LossService/{method}", request_serializer=_ident, response_deserializer=_ident
    )
    return check_outcome(lambda: f(payload, timeout=CALL_TIMEOUT), "raw")


def _truncations(data: bytes) -> list[bytes]:
    cuts = sorted({1, 2, 3, 5, 8, len(data) // 3, len(data) // 2, len(data) - 1, len(data) - 2})
    return [data[:k] for k in cuts if 0 < k < len(data)]


def test_truncated_and_random_bytes_never_crash(server: ServerProcess, channel: grpc.Channel) -> None:
    """Truncated and random bytes to every method: each gets OK or INVALID_ARGUMENT quickly;
    the server keeps SERVING and keeps computing correct answers."""
    rng = np.random.default_rng(0)
    good = _valid_request().SerializeToString()
    payloads = _truncations(good) + [rng.bytes(int(k)) for k in rng.integers(1, 2000, 40)]
    codes = set()
    for method in METHODS:
        for p in payloads:
            f = channel.unary_unary(
                f"/softgate.v1.LossService/{method}", request_serializer=_ident, response_deserializer=_ident
            )
            try:
                f(p, timeout=CALL_TIMEOUT)
                codes.add("OK")
            except grpc.RpcError as e:
                codes.add(e.code().name)
    s = channel.stream_stream(
        "/softgate.v1.LossService/StreamLoss", request_serializer=_ident, response_deserializer=_ident
    )
    for p in payloads[:10]:
        try:
            list(s(iter([p]), timeout=CALL_TIMEOUT))
        except grpc.RpcError as e:
            codes.add(e.code().name)
    assert codes <= ALLOWED, codes
    assert grpc_health(channel) == "SERVING"
    assert send_loss(channel, _valid_request()) == "OK"


@pytest.mark.parametrize("method", METHODS)
def test_corrupt_protobuf_is_invalid_argument(channel: grpc.Channel, method: str) -> None:
    _raw_unary(channel, method, b"\xff\xff\xff")


def test_corrupt_protobuf_in_stream_is_invalid_argument(channel: grpc.Channel) -> None:
    s = channel.stream_stream(
        "/softgate.v1.LossService/StreamLoss", request_serializer=_ident, response_deserializer=_ident
    )
    check_outcome(lambda: list(s(iter([b"\xff\xff"]), timeout=CALL_TIMEOUT)), "stream")


def test_truncated_valid_requests_parse_or_refuse(channel: grpc.Channel) -> None:
    """Truncations that still parse as protobuf (cut on a field boundary) are refused or
    answered like any other message."""
    good = _valid_request().SerializeToString()
    req = pb.ComputeLossRequest()
    for k in range(len(good)):
        try:
            req.ParseFromString(good[:k])
        except Exception:
            continue
        send_loss(channel, req)


# ---------------------------------------------------------------- hand-picked hostile tensors

HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    # name: (changes to the valid request's batch.logp / offsets, expected status)
    "shape 10^12 with 16 bytes": (
        {"logp": pb.Tensor(dtype=1, shape=[10**12], data=b"\0" * 16)},
        "INVALID_ARGUMENT",
    ),
    "shape [2^62, 4]": (
        {"logp": pb.Tensor(dtype=1, shape=[1 << 62, 4], data=b"\0" * 16)},
        "INVALID_ARGUMENT",
    ),
    "shape [int64 max]": (
        {"logp": pb.Tensor(dtype=1, shape=[INT64_MAX], data=b"\0" * 16)},
        "INVALID_ARGUMENT",
    ),
    "shape [-1]": ({"logp": pb.Tensor(dtype=1, shape=[-1], data=b"\0" * 16)}, "INVALID_ARGUMENT"),
    "shape [-4, -1]": ({"logp": pb.Tensor(dtype=1, shape=[-4, -1], data=b"\0" * 16)}, "INVALID_ARGUMENT"),
    "shape of 9 dims": ({"logp": pb.Tensor(dtype=1, shape=[1] * 9, data=b"\0" * 4)}, "INVALID_ARGUMENT"),
    "shape [2, 2] (2-D)": ({"logp": _values_tensor([-1.0] * 4, 1, [2, 2])}, "INVALID_ARGUMENT"),
    "bytes not a multiple of dtype": ({"logp": pb.Tensor(dtype=1, data=b"\0" * 15)}, "INVALID_ARGUMENT"),
    "dtype unset": ({"logp": pb.Tensor(data=b"\0" * 16)}, "INVALID_ARGUMENT"),
    "dtype 99": ({"logp": pb.Tensor(dtype=99, data=b"\0" * 16)}, "INVALID_ARGUMENT"),
    "float16 logp": ({"logp": _values_tensor([-1.0] * 4, 9)}, "INVALID_ARGUMENT"),
    "bfloat16 logp": ({"logp": _values_tensor([-1.0] * 4, 10)}, "INVALID_ARGUMENT"),
    "NaN logp": ({"logp": _values_tensor([-1.0, float("nan"), -1.0, -1.0], 1)}, "INVALID_ARGUMENT"),
    "+inf logp": ({"logp": _values_tensor([-1.0, float("inf"), -1.0, -1.0], 1)}, "INVALID_ARGUMENT"),
    "logp > 0": ({"logp": _values_tensor([-1.0, 3.0, -1.0, -1.0], 1)}, "INVALID_ARGUMENT"),
    "offsets overflow int64": ({"offsets": _values_tensor([0, INT64_MAX, 4], 3)}, "INVALID_ARGUMENT"),
    "offsets int64 min": ({"offsets": _values_tensor([0, INT64_MIN, 4], 3)}, "INVALID_ARGUMENT"),
    "negative sequence length": ({"offsets": _values_tensor([0, 3, 1, 4], 3)}, "INVALID_ARGUMENT"),
    "offsets[0] != 0": ({"offsets": _values_tensor([1, 2, 4], 3)}, "INVALID_ARGUMENT"),
    "offsets[B] != N": ({"offsets": _values_tensor([0, 2, 5], 3)}, "INVALID_ARGUMENT"),
    "offsets float": ({"offsets": _values_tensor([0, 2, 4], 1)}, "INVALID_ARGUMENT"),
    "offsets empty": ({"offsets": pb.Tensor(dtype=3)}, "INVALID_ARGUMENT"),
    "offsets claim 2^40 sequences": (
        {"offsets": pb.Tensor(dtype=3, shape=[1 << 40], data=b"\0" * 24)},
        "INVALID_ARGUMENT",
    ),
    "2e9 tokens claimed": (
        {"logp": pb.Tensor(dtype=1, shape=[2 * 10**9], data=b"\0" * 16)},
        "INVALID_ARGUMENT",
    ),
    "bool mask byte 2": ({"mask": pb.Tensor(dtype=5, data=b"\1\2\1\1")}, "INVALID_ARGUMENT"),
    "group id int64 max": ({"group_ids": _values_tensor([INT64_MAX, INT64_MIN], 3)}, "OK"),
    "reward NaN": ({"rewards": _values_tensor([float("nan"), 1.0], 1)}, "INVALID_ARGUMENT"),
    # (was OK with silent zero advantages: the group's float64 std overflowed to inf)
    "reward 1e308": ({"rewards": _values_tensor([1e308, -1e308], 2)}, "INVALID_ARGUMENT"),
    "over max_tokens (real data)": (
        {"logp": _values_tensor([-1.0] * ((1 << 14) + 4), 1)},
        "INVALID_ARGUMENT",
    ),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_tensor(channel: grpc.Channel, name: str) -> None:
    changes, expected = HOSTILE[name]
    req = _valid_request()
    for field, t in changes.items():
        getattr(req.batch, field).CopyFrom(t)
    got = send_loss(channel, req)
    assert got == expected, f"{name}: got {got}, expected {expected}"


def _overflow_case(name: str) -> pb.ComputeLossRequest:
    req = _valid_request()
    b = req.batch
    if name == "num_seqs 1e-300":
        req.config.aggregation.num_seqs = 1e-300
    elif name == "advantages 3e38, ratio e^5 (reinforce)":
        b.ClearField("rewards")
        b.ClearField("group_ids")
        b.old_logp.CopyFrom(_values_tensor([-6.0, -5.5, -7.0, -5.1], 1))
        b.advantages.CopyFrom(_values_tensor([3e38, -3e38], 1))
        req.config.objective.reinforce.SetInParent()
    elif name == "float64 rewards +-1e308 (dr_grpo)":
        b.rewards.CopyFrom(_values_tensor([1e308, -1e308], 2))
        req.config.advantages.estimator = pb.ADVANTAGE_ESTIMATOR_DR_GRPO
    elif name == "log_ratio_clamp 1e300, float32 batch":
        req.config.log_ratio_clamp = 1e300
    elif name == "log_ratio_clamp 100, logp - old = 95":
        b.logp.CopyFrom(_values_tensor([0.0, -0.5, -2.0, -0.1], 1))
        b.old_logp.CopyFrom(_values_tensor([-95.0, -0.5, -2.0, -0.1], 1))
        req.config.log_ratio_clamp = 100.0
        req.config.objective.reinforce.SetInParent()
    return req


OVERFLOW = [
    # finite inputs whose float32 gradient overflows: OK with +-inf in the gradient
    "num_seqs 1e-300",
    "advantages 3e38, ratio e^5 (reinforce)",
    "float64 rewards +-1e308 (dr_grpo)",
    "log_ratio_clamp 100, logp - old = 95",
    # a clamp not representable in float32: RuntimeError in the engine -> INTERNAL
    "log_ratio_clamp 1e300, float32 batch",
]


@pytest.mark.parametrize("name", OVERFLOW)
def test_overflowing_inputs_refused(channel: grpc.Channel, name: str) -> None:
    """Found by the fuzzers (answered OK with +-inf gradients, or INTERNAL); refused since 5b3d7de."""
    assert send_loss(channel, _overflow_case(name)) == "INVALID_ARGUMENT"


def test_message_over_max_message_bytes(channel: grpc.Channel) -> None:
    """A message above the server's max_message_bytes (1 MiB here) is refused by gRPC itself."""
    req = _valid_request()
    req.batch.logp.CopyFrom(pb.Tensor(dtype=1, data=b"\0" * (2 << 20)))
    assert send_loss(channel, req) == "RESOURCE_EXHAUSTED"


def test_absurd_claims_are_cheap(server: ServerProcess, channel: grpc.Channel) -> None:
    """Claims of billions of elements with a few bytes are refused in milliseconds without the
    server allocating their size (RSS grows by far less than one claimed tensor)."""
    import time

    before = server.rss()
    t0 = time.perf_counter()
    for shape in ([10**12], [1 << 40], [3 * 10**9], [1 << 31, 1 << 31]):
        req = _valid_request()
        req.batch.logp.CopyFrom(pb.Tensor(dtype=2, shape=shape, data=struct.pack("<2d", -1.0, -1.0)))
        req.batch.old_logp.CopyFrom(req.batch.logp)
        assert send_loss(channel, req) == "INVALID_ARGUMENT"
    dt = time.perf_counter() - t0
    grew = server.rss() - before
    assert dt < 2.0, f"4 absurd claims took {dt:.2f} s"
    assert grew < 64 << 20, f"server RSS grew by {grew >> 20} MiB on absurd claims"


def test_fuzz_examples_leave_server_serving(server: ServerProcess, channel: grpc.Channel) -> None:
    assert server.proc is not None and server.proc.poll() is None
    assert grpc_health(channel) == "SERVING"
    assert send_loss(channel, _valid_request()) == "OK"
