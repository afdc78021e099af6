"""The server's copy-saving wire paths give exactly what the protobuf classes give: zero-copy
views of a large request's tensor bytes (`codec.Received`) and hand-encoded responses
(`codec.Encoded`) for ComputeLoss and StreamLoss."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from softgate.engine import OBJECTIVES, Batch, Engine, LossConfig, Sapo
from softgate.engine.errors import FieldViolation, InputError
from softgate.grpc import codec
from softgate.grpc.servicer import LossServicer
from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

try:
    from tests.reference_loss import PER_SEQUENCE_ADVANTAGES, make_config, random_batch
except ImportError:  # tests/ is not a package from this rootdir
    from reference_loss import PER_SEQUENCE_ADVANTAGES, make_config, random_batch  # type: ignore[no-redef]


def _tensor(a: np.ndarray, dtype: int) -> pb.Tensor:
    return pb.Tensor(dtype=dtype, shape=[a.shape[0]], data=a.tobytes())  # type: ignore[arg-type]


def _request(n: int, seqs: int = 8, dtype: type = np.float32) -> pb.ComputeLossRequest:
    rng = np.random.default_rng(n)
    pdt = pb.DTYPE_FLOAT32 if dtype == np.float32 else pb.DTYPE_FLOAT64
    logp = -rng.random(n).astype(dtype) - 0.01
    old = logp + rng.standard_normal(n).astype(dtype) * 0.01
    off = np.linspace(0, n, seqs + 1).astype(np.int64)
    b = pb.Batch(
        logp=_tensor(logp, pdt),
        old_logp=_tensor(old, pdt),
        offsets=_tensor(off, pb.DTYPE_INT64),
        mask=_tensor((rng.random(n) > 0.1).astype(np.uint8), pb.DTYPE_BOOL),
        rewards=_tensor(rng.random(seqs).astype(dtype), pdt),
        group_ids=_tensor(np.arange(seqs, dtype=np.int64) // 4, pb.DTYPE_INT64),
    )
    return pb.ComputeLossRequest(batch=b, config=pb.LossConfig(objective=pb.Objective(sapo=pb.SapoParams())))


def _same_batch(a: Batch, b: Batch) -> None:
    for name in ("logp", "offsets", "old_logp", "mask", "rewards", "group_ids", "advantages"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


@pytest.mark.parametrize("n", [1 << 18, 5])
def test_views_decode_like_the_message(n: int) -> None:
    request = _request(n)
    data = request.SerializeToString()
    got = codec.safe_deserializer(pb.ComputeLossRequest, batch_field=2)(data)
    assert isinstance(got, codec.Received) and got.nbytes == len(data)
    msg = got.message
    if len(data) >= codec.VIEW_MIN_BYTES:
        assert set(got.views) == {"logp", "old_logp", "offsets", "mask", "rewards", "group_ids"}
        for name, view in got.views.items():
            assert bytes(view) == getattr(request.batch, name).data, name
            assert getattr(msg.batch, name).data == b""  # left out of the parse: the view has it
        want = request.SerializeToString()
        for name in got.views:
            getattr(request.batch, name).ClearField("data")
        assert msg == request  # everything but the data, as sent
        request.ParseFromString(want)
    else:
        assert got.views == {} and msg == request  # small: not worth the walk
    v: list[FieldViolation] = []
    a = codec.decode_batch(msg.batch, "batch.", v, got.views)
    b = codec.decode_batch(request.batch, "batch.", v)
    assert not v and a is not None and b is not None
    _same_batch(a, b)


def _address(buf: Any) -> int:
    return int(np.frombuffer(buf, np.uint8).ctypes.data)


def test_aligned_tensors_of_a_large_request_are_read_in_place() -> None:
    # the Python client pads large requests (Tensor.padding) so that each tensor's data starts
    # at a multiple of 16 bytes; the server then uses the received bytes without a copy
    from softgate_client import _wire
    from softgate_client.client import pack_batch

    n = 1 << 17
    rng = np.random.default_rng(1)
    logp = -rng.random(n).astype(np.float32) - 0.01
    p = pack_batch(
        logp,
        logp - 0.01,
        lengths=[n // 2, n - n // 2],
        mask=rng.random(n) > 0.1,
        rewards=[1.0, 0.0],
        group_ids=[0, 0],
    )
    data = _wire.message({}, {2: p.placed()}).join()
    assert len(data) >= codec.VIEW_MIN_BYTES
    got = codec.safe_deserializer(pb.ComputeLossRequest, batch_field=2)(data)
    assert isinstance(got, codec.Received)
    v: list[FieldViolation] = []
    a = codec.decode_batch(got.message.batch, "batch.", v, got.views)
    b = codec.decode_batch(pb.ComputeLossRequest.FromString(data).batch, "batch.", v)  # all parsed: copies
    assert not v and a is not None and b is not None
    _same_batch(a, b)
    base = _address(data)
    for name in ("logp", "old_logp", "offsets", "mask"):
        x = getattr(a, name)
        assert x.data_ptr() == _address(got.views[name]) and (x.data_ptr() - base) % 16 == 0, name
    del data, got  # the tensors keep the received bytes alive
    import gc

    gc.collect()
    _same_batch(a, b)
    # bytes that do not start on the boundary are copied (aligned, torch-owned memory)
    buf = bytes(4 * 100 + 4)
    for start in (0, 4):
        view = memoryview(buf)[start : start + 400]
        t = codec._tensor_over(view, torch.float32, 100)
        shared = (_address(view) % codec.SHARE_ALIGN) == 0
        assert (t.data_ptr() == _address(view)) == shared and t.data_ptr() % codec.SHARE_ALIGN == 0
    # a small request's field, the bytes object protobuf made for it, is used in place alike
    for size in (400, 404):
        raw = bytes(size)
        t = codec._tensor_over(raw, torch.float32, 100)
        shared = (_address(raw) % codec.SHARE_ALIGN) == 0
        assert (t.data_ptr() == _address(raw)) == shared and t.data_ptr() % codec.SHARE_ALIGN == 0


@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_the_engine_never_writes_into_a_request(objective: str) -> None:
    # a request's tensors may be its received bytes (above): every input must stay as it came
    for adv, kl, mm in (("rewards", "k3", ("token", "truncate")), ("token", None, ("sequence", "mask"))):
        if objective in PER_SEQUENCE_ADVANTAGES and adv == "token":
            adv = "sequence"
        batch = random_batch(3, max_seqs=9, max_len=17, advantages=adv)
        frozen = {}
        for f in (
            "logp",
            "old_logp",
            "ref_logp",
            "rollout_logp",
            "mask",
            "offsets",
            "rewards",
            "group_ids",
            "advantages",
        ):
            x = getattr(batch, f)
            if x is not None:
                raw = x.contiguous().view(torch.uint8).numpy().tobytes()
                frozen[f] = raw
                setattr(batch, f, torch.frombuffer(raw, dtype=x.dtype))  # backed by an immutable bytes
        for compile in (False, "sync") if objective == "sapo" else (False,):
            Engine(device="cpu", compile=compile).loss(
                batch, make_config(objective, "seq_mean_token_mean", kl, mm)
            )
            for f, raw in frozen.items():
                assert getattr(batch, f).view(torch.uint8).numpy().tobytes() == raw, (objective, f)


def test_a_tensor_without_a_shape_is_parsed_whole() -> None:
    # left out of the parse, a tensor's length would be unknown to the limits: no 1-D shape,
    # no stripping (the whole message is parsed, the views still serve the decode)
    request = _request(1 << 18)
    request.batch.logp.ClearField("shape")
    data = request.SerializeToString()
    got = codec.safe_deserializer(pb.ComputeLossRequest, batch_field=2)(data)
    assert isinstance(got, codec.Received) and got.message == request and "logp" in got.views
    assert codec.check_batch_limits(got.message.batch, "batch.", codec.Limits(), []) == (1 << 18, 8)


def test_views_skip_repeated_fields() -> None:
    """Protobuf merges a repeated message field and keeps the last bytes value: no view then."""
    first = _request(1 << 18)
    # (no shape: a repeated field would be appended to, [n, n])
    second_logp = pb.Tensor(data=np.full(1 << 18, -2, np.float32).tobytes())
    second = pb.ComputeLossRequest(batch=pb.Batch(logp=second_logp))
    data = first.SerializeToString() + second.SerializeToString()
    got = codec.safe_deserializer(pb.ComputeLossRequest, batch_field=2)(data)
    assert isinstance(got, codec.Received)
    assert got.views == {}  # two Batch occurrences: read the merged message
    v: list[FieldViolation] = []
    b = codec.decode_batch(got.message.batch, "batch.", v, got.views)
    assert not v and b is not None and bool((b.logp == -2).all())
    # one Batch whose logp data occurs twice: that tensor is read from the message
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1 << 18], data=np.zeros(1 << 18, np.float32).tobytes())
    extra = t.SerializeToString() + pb.Tensor(data=np.ones(1 << 18, np.float32).tobytes()).SerializeToString()
    body = b"\x0a" + _varint(len(extra)) + extra  # Batch.logp
    data = b"\x12" + _varint(len(body)) + body  # ComputeLossRequest.batch
    got = codec.safe_deserializer(pb.ComputeLossRequest, batch_field=2)(data)
    assert isinstance(got, codec.Received) and "logp" not in got.views
    b = codec.decode_batch(got.message.batch, "batch.", v, got.views)
    assert b is None  # offsets missing, but logp decoded from the merged message: no view used
    assert any("offsets" in x.field for x in v)


def _varint(n: int) -> bytes:
    from softgate_client import _wire

    return _wire.varint(n)


def _result(n: int = 64, dtype: torch.dtype = torch.float32) -> Any:
    return Engine(device="cpu").loss(_batch(n, dtype), LossConfig(objective=Sapo()))


def _batch(n: int, dtype: torch.dtype = torch.float32) -> Batch:
    g = torch.Generator().manual_seed(n)
    logp = -torch.rand(n, generator=g, dtype=dtype) - 0.5
    old = logp + 0.05 * torch.randn(n, generator=g, dtype=dtype).clamp(-2, 2)
    off = torch.tensor([0, n // 3, n // 3, n], dtype=torch.int64)
    mask = torch.rand(n, generator=g) > 0.2
    return Batch(
        logp=logp,
        old_logp=old,
        offsets=off,
        mask=mask,
        advantages=torch.tensor([1.0, -0.5, 2.0], dtype=dtype),
    )


ALL = ("gradient", "advantages", "ratio", "gate_weight", "clip_mask", "mask")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("names", [("gradient",), ALL, ()])
def test_encoded_loss_response_equals_protobuf(dtype: torch.dtype, names: tuple[str, ...]) -> None:
    result = _result(dtype=dtype)
    host = codec.host_result(result, names)
    want = pb.ComputeLossResponse(loss=result.loss, policy_loss=result.policy_loss, kl_loss=result.kl_loss)
    want.metrics.update(codec.metrics_map(result.metrics))
    codec.fill_outputs(want.outputs, host, names)
    enc = codec.encode_loss_response(result, host, names)
    assert pb.ComputeLossResponse.FromString(enc.data) == want
    assert codec.serializer(pb.ComputeLossResponse)(enc) == enc.data
    assert codec.serializer(pb.ComputeLossResponse)(want) == want.SerializeToString()


def test_encoded_stream_responses_equal_protobuf() -> None:
    n = 96
    g = torch.Generator().manual_seed(3)
    chunks = []
    for k in (40, 0, 56):  # an empty chunk in the middle
        logp = -torch.rand(k, generator=g) - 0.01
        chunks.append(
            Batch(
                logp=logp,
                old_logp=logp + 0.01,
                offsets=torch.tensor([0, k // 2, k], dtype=torch.int64),
                rewards=torch.rand(2, generator=g),
                group_ids=torch.tensor([0, 1], dtype=torch.int64),
            )
        )
    assert sum(c.num_tokens for c in chunks) == n
    with ThreadPoolExecutor(1) as pool:
        s = LossServicer(Engine(device="cpu"), pool)
        cfg = codec.decode_loss_config(pb.LossConfig(), [])
        sel = codec.selected_outputs(pb.OutputSelection(ratio=True, clip_mask=True))
        plain = s._stream_loss(cfg, sel, list(chunks), threading.Event(), False)[1]
        enc = list(s._stream_loss(cfg, sel, list(chunks), threading.Event(), True)[1])
    assert len(plain) == len(enc) == 3
    for p, e in zip(plain, enc, strict=True):
        assert isinstance(e, codec.Encoded)
        assert pb.StreamLossResponse.FromString(e.data) == p


def _padding_cleared(msg: Any) -> Any:
    msg.outputs.gradient.ClearField("padding")
    return msg


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [40, 5000, 70000])
def test_a_gradient_response_written_in_place_equals_the_encoded_one(dtype: torch.dtype, n: int) -> None:
    from softgate.engine.metrics import METRIC_NAMES
    from softgate.grpc.response_buffer import GradientResponse
    from softgate_client import _wire

    result = _result(n, dtype)
    out = GradientResponse(n, dtype)
    assert out.grad.data_ptr() % _wire.ALIGN == 0 and out.grad.dtype == dtype and out.grad.shape == (n,)
    again = Engine(device="cpu").loss(_batch(n, dtype), LossConfig(objective=Sapo()), grad_out=out.grad)
    assert again.grad.data_ptr() == out.grad.data_ptr()
    got = out.encode(again)
    want = codec.encode_loss_response(result, result, ("gradient",))
    assert tuple(result.metrics) == tuple(METRIC_NAMES)
    parsed = pb.ComputeLossResponse.FromString(got.data)
    assert _padding_cleared(parsed) == pb.ComputeLossResponse.FromString(want.data)
    assert codec.serializer(pb.ComputeLossResponse)(got) is got.data
    # the gradient's bytes start at a multiple of 16 in the message (Tensor.padding), and the
    # client reads the response either way
    data_at = got.data.index(result.grad.numpy().tobytes())
    assert data_at % _wire.ALIGN == 0
    _, arrays = _wire.split_response(got.data, 5, pb.ComputeLossResponse)
    assert np.array_equal(arrays["gradient"], result.grad.numpy())


def test_a_gradient_response_copies_a_gradient_the_engine_kept_and_encodes_other_results() -> None:
    import dataclasses
    import gc

    from softgate.grpc.response_buffer import GradientResponse

    result = _result(64)
    out = GradientResponse(64, torch.float32)
    got = out.encode(result)  # the engine wrote its gradient elsewhere: copied in
    assert pb.ComputeLossResponse.FromString(got.data).outputs.gradient.data == result.grad.numpy().tobytes()
    # a result that is not a gradient response of this shape: the usual encoding
    other = dataclasses.replace(result, metrics={"loss": result.loss})
    assert (
        GradientResponse(64, torch.float32).encode(other).data
        == codec.encode_loss_response(other, other, ("gradient",)).data
    )
    short = dataclasses.replace(result, grad=result.grad[:10])
    assert len(GradientResponse(64, torch.float32).encode(short).data) < len(got.data)
    # the gradient tensor keeps the response's bytes alive
    grad = GradientResponse(64, torch.float32).grad
    gc.collect()
    grad.fill_(2.5)
    assert torch.all(grad == 2.5)


def test_only_large_gradient_only_calls_of_a_cpu_engine_are_written_in_place() -> None:
    from softgate.grpc.response_buffer import gradient_response

    cpu = torch.device("cpu")
    batch = _batch(1 << 18)  # a 1 MiB float32 gradient
    assert gradient_response(batch, ("gradient",), cpu) is not None
    assert gradient_response(_batch((1 << 18) - 1), ("gradient",), cpu) is None  # small: copied
    assert gradient_response(batch, ("gradient", "ratio"), cpu) is None
    assert gradient_response(batch, (), cpu) is None
    assert gradient_response(batch, ("gradient",), torch.device("meta")) is None
    f64 = gradient_response(_batch(1 << 18, torch.float64), ("gradient",), cpu)
    assert f64 is not None and f64.grad.dtype == torch.float64


@pytest.mark.parametrize("names", [("gradient",), ALL, ()])
def test_client_parses_small_and_large_responses_alike(names: tuple[str, ...], monkeypatch: Any) -> None:
    """The client parses a small response with protobuf whole and walks a large one for
    zero-copy views: the same message and arrays either way."""
    from softgate_client import _wire

    result = _result()
    data = codec.encode_loss_response(result, codec.host_result(result, names), names).data
    small_msg, small = _wire.split_response(data, 5, pb.ComputeLossResponse)
    monkeypatch.setattr(_wire, "SMALL_RESPONSE_BYTES", 0)
    big_msg, big = _wire.split_response(data, 5, pb.ComputeLossResponse)
    assert small_msg == big_msg and not small_msg.HasField("outputs")
    assert set(small) == set(big) == set(names)
    for name in names:
        assert small[name].dtype == big[name].dtype and np.array_equal(small[name], big[name])


def test_a_config_message_is_decoded_once_and_its_violations_every_time() -> None:
    msg = pb.LossConfig(log_ratio_clamp=5.0)
    msg.objective.sapo.tau_pos = 2.0
    v: list[FieldViolation] = []
    a = codec.decode_loss_config(msg, v)
    assert codec.decode_loss_config(pb.LossConfig.FromString(msg.SerializeToString()), v) is a and not v
    assert a.objective == Sapo(tau_pos=2.0) and a.log_ratio_clamp == 5.0
    msg.objective.sapo.tau_pos = 3.0
    assert codec.decode_loss_config(msg, v).objective == Sapo(tau_pos=3.0)
    bad = pb.LossConfig()
    bad.aggregation.mode = 99  # an enum value this server does not know
    for prefix in ("config.", "chunk[1].config.", "config."):  # remembered per prefix: each its own
        found: list[FieldViolation] = []
        codec.decode_loss_config(bad, found, prefix)
        assert [f.field for f in found] == [prefix + "aggregation.mode"]


def test_every_configuration_field_sent_is_decoded() -> None:
    """mismatch mode (mask, truncate) / hi, min_group_std and saturation_threshold arrive as sent."""
    msg = pb.LossConfig(
        advantages=pb.AdvantageConfig(estimator=pb.ADVANTAGE_ESTIMATOR_RLOO, min_group_std=0.125),
        mismatch=pb.MismatchConfig(mode=pb.MISMATCH_MODE_MASK, lo=0.25, hi=3.5),
        saturation_threshold=0.625,
    )
    v: list[FieldViolation] = []
    c = codec.decode_loss_config(msg, v)
    assert v == []
    assert (c.advantages.estimator, c.advantages.min_group_std) == ("rloo", 0.125)
    assert c.mismatch is not None and (c.mismatch.mode, c.mismatch.lo, c.mismatch.hi) == ("mask", 0.25, 3.5)
    assert c.saturation_threshold == 0.625
    trunc = codec.decode_loss_config(
        pb.LossConfig(mismatch=pb.MismatchConfig(mode=pb.MISMATCH_MODE_TRUNCATE)), v
    )
    assert trunc.mismatch is not None and trunc.mismatch.mode == "truncate"
    seq = codec.decode_loss_config(
        pb.LossConfig(mismatch=pb.MismatchConfig(mode=pb.MISMATCH_MODE_SEQ_MASK)), v
    )
    assert seq.mismatch is not None and seq.mismatch.mode == "seq_mask"


# (found missing by a mutation-testing audit)


@pytest.mark.parametrize("claimed", [2, 4])
def test_a_shape_that_claims_fewer_or_more_elements_than_the_bytes_is_refused(claimed):
    """3 float32 elements of data: a shape [2] must not silently drop the third (nor [4] read past)."""
    t = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[claimed], data=np.arange(3, dtype=np.float32).tobytes())
    v: list = []
    assert codec.decode_tensor(t, "batch.logp", v) is None
    assert [(x.field, x.code) for x in v] == [("batch.logp", "shape_mismatch")]


def test_a_tensor_keeps_the_shape_it_claims() -> None:
    """No shape means all the bytes' elements; a 2-D claim stays 2-D (for the engine to refuse),
    it is not flattened; encode_tensor writes the tensor's own shape."""
    v: list[FieldViolation] = []
    data = np.arange(4, dtype=np.float32).tobytes()
    flat = codec.decode_tensor(pb.Tensor(dtype=pb.DTYPE_FLOAT32, data=data), "t", v)
    grid = codec.decode_tensor(pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 2], data=data), "t", v)
    assert v == [] and flat is not None and grid is not None
    assert flat.tolist() == [0.0, 1.0, 2.0, 3.0] and grid.shape == (2, 2)
    assert list(codec.encode_tensor(torch.zeros(2, 3)).shape) == [2, 3]


def test_int8_and_uint8_tensors_are_decoded_and_encoded_as_themselves() -> None:
    """INT8 bytes are signed, UINT8 unsigned, and each encodes back to its own dtype."""
    v: list[FieldViolation] = []
    i8 = codec.decode_tensor(pb.Tensor(dtype=pb.DTYPE_INT8, shape=[2], data=b"\xff\x01"), "t", v)
    u8 = codec.decode_tensor(pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[2], data=b"\xff\x01"), "t", v)
    assert v == [] and i8 is not None and u8 is not None
    assert (i8.dtype, i8.tolist(), u8.dtype, u8.tolist()) == (torch.int8, [-1, 1], torch.uint8, [255, 1])
    assert codec.encode_tensor(torch.tensor([-1], dtype=torch.int8)).dtype == pb.DTYPE_INT8
    assert codec.encode_tensor(torch.tensor([255], dtype=torch.uint8)).dtype == pb.DTYPE_UINT8


def _limits_batch(tokens: int, seqs: int) -> pb.Batch:
    off = np.linspace(0, tokens, seqs + 1).astype(np.int64)
    return pb.Batch(
        logp=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[tokens], data=bytes(4 * tokens)),
        offsets=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[seqs + 1], data=off.tobytes()),
    )


def test_limits_admit_a_batch_of_exactly_the_maximum():
    lim = codec.Limits(max_tokens=8, max_sequences=4)
    v: list = []
    assert codec.check_batch_limits(_limits_batch(8, 4), "batch.", lim, v) == (8, 4)
    assert v == []
    codec.check_batch_limits(_limits_batch(9, 5), "batch.", lim, v)
    assert [(x.field, x.code) for x in v] == [("batch.logp", "too_large"), ("batch.offsets", "too_large")]
    # a stream's chunks count together: 6 + 2 tokens fit, 6 + 3 do not
    v = []
    codec.check_batch_limits(_limits_batch(2, 1), "chunk[1].", lim, v, tokens_before=6, seqs_before=3)
    assert v == []
    codec.check_batch_limits(_limits_batch(3, 1), "chunk[1].", lim, v, tokens_before=6, seqs_before=3)
    assert [(x.field, x.code) for x in v] == [("chunk[1].logp", "too_large")]


def test_an_engine_violation_names_the_request_field_it_lies_in():
    """'advantages' alone is the batch's tensor; 'advantages.<x>' the AdvantageConfig's field;
    'batch' (the batch as a whole: its loss overflowed) is `batch` (a stream chunk's: ``)."""
    assert codec.request_field("batch") == "batch"
    assert codec.request_field("batch", batch_prefix="") == ""
    assert codec.request_field("advantages") == "batch.advantages"
    assert codec.request_field("advantages.min_group_std") == "config.advantages.min_group_std"
    assert codec.request_field("objective.grpo.dual_clip") == "config.objective.grpo.dual_clip"
    assert codec.request_field("logp") == "batch.logp"


def test_a_varint_longer_than_protobufs_ten_bytes_is_refused_at_once() -> None:
    """A run of bytes >= 0x80 is no varint past 10 bytes: refused there, not read on into an
    ever larger int (a 1 MiB request of 0xff bytes held the server's event loop for ~30 s, the
    cost growing with the square of its size; an audit). Such a request is corrupt."""
    from softgate_client._wire import read_varint

    assert read_varint(memoryview(b"\xff" * 9 + b"\x01"), 0) == (2**64 - 1, 10)
    with pytest.raises(ValueError, match="longer than 10 bytes"):
        read_varint(memoryview(b"\xff" * 64), 0)
    for cls, field in ((pb.ComputeLossRequest, 2), (pb.StreamLossRequest, 3)):
        assert isinstance(codec.safe_deserializer(cls, field)(b"\xff" * (1 << 20)), codec.CorruptMessage)


def test_a_request_of_too_many_fields_or_dimensions_is_refused_before_it_is_parsed() -> None:
    """No softgate.v1 message has more than a handful of fields at a level, nor a tensor more
    than a few dimensions: 64 MiB of empty config fields was walked in Python on the event loop
    (20 s), and a packed shape of 64 Mi one-byte dimensions became 512 MB of int64 in protobuf
    (an audit). Both are CORRUPT at once; a 2-D tensor of a large request is not."""
    for cls, field in (
        (pb.ComputeLossRequest, 2),
        (pb.StreamLossRequest, 3),
        (pb.ComputeAdvantagesRequest, None),
    ):
        got = codec.safe_deserializer(cls, field)(b"\x0a\x00" * (1 << 16))  # (field 1, empty)
        assert isinstance(got, codec.CorruptMessage) and "more than 64 fields" in got.error
    shape = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1] * (1 << 17))
    for msg, cls, field in (
        (pb.ComputeLossRequest(batch=pb.Batch(logp=shape)), pb.ComputeLossRequest, 2),
        (pb.StreamLossRequest(chunk=pb.Batch(mask=shape)), pb.StreamLossRequest, 3),
        (pb.ComputeAdvantagesRequest(rewards=shape), pb.ComputeAdvantagesRequest, None),
    ):
        got = codec.safe_deserializer(cls, field)(msg.SerializeToString())
        assert isinstance(got, codec.CorruptMessage) and "more than 16 dimensions" in got.error
    n = 1 << 16
    flat = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, n // 2], data=np.zeros(n, np.float32).tobytes())
    ok = pb.ComputeLossRequest(batch=pb.Batch(logp=flat)).SerializeToString()
    assert not isinstance(codec.safe_deserializer(pb.ComputeLossRequest, 2)(ok), codec.CorruptMessage)
    # a varint cut off at the end is protobuf's to refuse (the scan raised IndexError: INTERNAL)
    assert isinstance(codec.safe_deserializer(pb.ComputeLossRequest, 2)(ok + b"\x80"), codec.CorruptMessage)


def test_a_known_field_sent_with_another_wire_type_is_named() -> None:
    """Found by an audit (a hand encoder in C++): a double written as a float (wire type 5), or
    an enum as fixed32, was refused as an unknown field of a newer contract ("upgrade the
    server"), the field unnamed; protobuf keeps such a field among the unknown ones. Now it is
    `bad_protobuf` naming the field and both wire types, in a config and in a tensor (on the
    view path of a large request too)."""
    import struct

    for n in (5, 1 << 18):
        request = _request(n)
        eps_as_float = bytes([1 << 3 | 5]) + struct.pack("<f", 0.2)  # GrpoParams.eps_low = 1 (double)
        request.config.objective.grpo.MergeFromString(eps_as_float)
        old = request.batch.old_logp
        old.CopyFrom(pb.Tensor.FromString(old.SerializeToString() + bytes([1 << 3 | 5, 1, 0, 0, 0])))
        got = codec.safe_deserializer(pb.ComputeLossRequest, batch_field=2)(request.SerializeToString())
        assert isinstance(got, codec.Received)
        v: list[FieldViolation] = []
        codec.decode_loss_config(got.message.config, v)
        assert codec.decode_batch(got.message.batch, "batch.", v, got.views) is None
        assert [(x.field, x.code) for x in v] == [
            ("config.objective.grpo.eps_low", "bad_protobuf"),
            ("batch.old_logp.dtype", "bad_protobuf"),
        ], v
        assert v[0].reason.endswith("field 1 (eps_low) is double, read from wire type 1; got wire type 5")
        assert v[1].reason.endswith("field 1 (dtype) is Dtype, read from wire type 0; got wire type 5")
    v = []
    shape = pb.Tensor.FromString(bytes([2 << 3 | 1]) + bytes(8))  # shape (repeated int64) as fixed64
    codec.unknown_fields(shape, "batch.logp", v, deep=False)
    assert [x.field for x in v] == ["batch.logp.shape"] and "wire type 0 or 2 (packed)" in v[0].reason


def test_an_unknown_field_inside_a_tensor_is_refused_on_the_view_path_too() -> None:
    """Found by an audit: a Tensor's fields the server does not have (a newer contract's byte
    order, strides, scale: what changes how `data` reads) were dropped, the bytes read as if
    they were not there. decode_tensor refuses one as unknown_name, on the parsed message of a
    small request and on the stripped one whose bytes are a view (a large request) alike."""
    for n in (5, 1 << 18):
        request = _request(n)
        old = request.batch.old_logp
        old.CopyFrom(pb.Tensor.FromString(old.SerializeToString() + bytes([4 << 3 | 0, 1])))  # field 4 = 1
        got = codec.safe_deserializer(pb.ComputeLossRequest, batch_field=2)(request.SerializeToString())
        assert isinstance(got, codec.Received)
        assert bool(got.views) == (n > 5)  # the large one is read through views
        v: list[FieldViolation] = []
        assert codec.decode_batch(got.message.batch, "batch.", v, got.views) is None
        assert [(x.field, x.code) for x in v] == [("batch.old_logp", "unknown_name")], v
        assert "field number 4 of softgate.v1.Tensor" in v[0].reason
    # `padding` (15) is a field of Tensor, not an unknown one
    v = []
    padded = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1], data=bytes(4), padding=b"\0" * 3)
    assert codec.decode_tensor(padded, "batch.logp", v) is not None and v == []


def test_engine_violations_name_dtypes_as_the_contract_does() -> None:
    """Found by an audit: engine reasons passed on as they were named torch dtypes
    ("torch.float16"), which mean nothing to a trainer in Go or C++; the gRPC adapter names
    them as softgate.v1's Dtype does. A name the contract lacks stays as it is."""
    err = InputError(
        [
            FieldViolation("mask", "bad_dtype: torch.float16; bool or 0/1 expected"),
            FieldViolation("rewards", "bad_dtype: torch.bool given, a float or integer dtype expected", 2),
            FieldViolation("x", "bad_dtype: torch.complex64 given"),
        ]
    )
    got = codec.rename(err, lambda f: f).violations
    assert [(f.field, f.reason, f.index) for f in got] == [
        ("mask", "bad_dtype: DTYPE_FLOAT16; bool or 0/1 expected", None),
        ("rewards", "bad_dtype: DTYPE_BOOL given, a float or integer dtype expected", 2),
        ("x", "bad_dtype: torch.complex64 given", None),
    ]
