"""The client's own checks of its arguments, made before anything is sent (no server needed):
each refusal is an InvalidArgumentError naming the field, the same for `loss` and `advantages`."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from softgate_client import InvalidArgumentError, SoftgateClient, pack_batch
from softgate_client import config as cfg


@pytest.fixture()
def client():
    # nothing listens here: every call below is refused before the channel connects
    with SoftgateClient("127.0.0.1:1", retries=1, timeout=5) as c:
        yield c


def refusal(fn) -> tuple[str, str]:
    """(field, description) of the one violation `fn()` is refused with."""
    with pytest.raises(InvalidArgumentError) as ei:
        fn()
    (v,) = ei.value.violations
    return v.field, v.description


@pytest.mark.parametrize(
    "kw, missing",
    [({"client_cert": b"cert"}, "client_key"), ({"client_key": b"key"}, "client_cert")],
    ids=["cert_only", "key_only"],
)
def test_half_of_an_mtls_pair_is_refused_before_grpc(kw, missing) -> None:
    # client_cert alone made gRPC abort the process on the first call; client_key alone gave plaintext
    with pytest.raises(ValueError, match=f"together: {missing} is missing"):
        SoftgateClient("localhost:50051", **kw)


def test_advantages_checks_rewards_and_group_ids_as_loss_does(client) -> None:
    r = [1.0, 0.0, 1.0, 0.0]
    lp = -np.ones((4, 1), np.float32)
    cases = [
        (r, [0.5, 0.7, 1.5, 1.7], "group_ids", "bad_dtype"),  # was truncated to int: wrong groups
        (r, ["a", "b", "c", "d"], "group_ids", "bad_dtype"),
        (r, [0, 0, 1], "group_ids", "bad_shape"),
    ]
    for rewards, gids, name, reason in cases:
        field, desc = refusal(lambda: client.advantages(rewards, gids))  # noqa: B023
        assert (field, desc.split(":")[0]) == (name, reason), desc
        field, desc2 = refusal(lambda: client.loss(lp, rewards=rewards, group_ids=gids))  # noqa: B023
        assert (field, desc2) == (f"batch.{name}", desc)


@pytest.mark.parametrize(
    ("extra", "name"), [({"position": "trained"}, "position"), ({"zero_tail": True}, "zero_tail")]
)
def test_advantages_passes_every_config_field_to_the_server(inprocess_server, extra, name) -> None:
    """advantages() rebuilt the AdvantageConfig field by field and dropped position and
    zero_tail: plain GRPO advantages came back where the server refuses them (an audit)."""
    client = SoftgateClient(inprocess_server().target)
    adv = cfg.AdvantageConfig(**extra)
    field, desc = refusal(lambda: client.advantages([1.0, 0.0, 1.0, 0.0], [0, 0, 1, 1], config=adv))
    assert (field, desc.split(":")[0]) == (f"config.{name}", "unsupported"), desc
    # the keyword arguments still override the config's fields
    got = client.advantages(
        [1.0, 0.0], [0, 0], config=cfg.AdvantageConfig(estimator="rloo"), estimator="dr_grpo"
    )
    assert got.advantages.tolist() == [0.5, -0.5]


@pytest.mark.parametrize(
    "half",
    [
        lambda r: torch.tensor(r, dtype=torch.bfloat16),
        lambda r: torch.tensor(r, dtype=torch.float16),
        np.float16,
    ],
    ids=["bfloat16", "float16", "numpy_float16"],
)
def test_half_precision_rewards_are_taken_as_the_engine_takes_them(inprocess_server, half) -> None:
    """A reward model's bf16 scores were refused; the engine reduces rewards in float64 whatever
    their dtype, and every half value is exact in float32."""
    client = SoftgateClient(inprocess_server().target)
    r, gids = [1.0, 0.0, 0.5, 0.25], [0, 0, 1, 1]
    rewards = half(r) if half is not np.float16 else np.array(r, np.float16)
    r32 = np.array(r, np.float32)  # (what a half is widened to)
    got, want = client.advantages(rewards, gids), client.advantages(r32, gids)
    assert got.advantages.tolist() == want.advantages.tolist()
    lp = -np.ones((4, 1), np.float32)
    got, want = client.loss(lp, rewards=rewards, group_ids=gids), client.loss(lp, rewards=r32, group_ids=gids)
    assert got.loss == want.loss


def test_half_precision_names_the_field_and_what_to_send() -> None:
    lp = -np.ones((2, 3), np.float32)
    _, desc = refusal(lambda: pack_batch(lp, advantages=torch.ones(2, dtype=torch.bfloat16)))
    assert desc.startswith("half_precision: advantages is bfloat16; send advantages as float32 or float64")
    assert "log-prob" not in desc
    _, desc = refusal(lambda: pack_batch(torch.from_numpy(lp).bfloat16()))
    assert desc.startswith("half_precision: logp is bfloat16; send logp as float32") and "log-prob" in desc
    # every field whose name ends in `logp` gets the note, not only logp itself
    field, desc = refusal(lambda: pack_batch(lp, torch.ones(2, 3, dtype=torch.bfloat16), advantages=[1, 2]))
    assert field == "batch.old_logp"
    assert (
        desc.startswith("half_precision: old_logp is bfloat16; send old_logp as float32")
        and "log-prob" in desc
    )


def test_a_mask_of_any_dtype_is_a_mask() -> None:
    lp = -np.ones((2, 4), np.float32)
    m = np.array([[1, 0, 1, 0], [1, 1, 0, 0]])
    want = pack_batch(lp, mask=m.astype(bool), advantages=[1.0, -1.0])
    masks = [torch.from_numpy(m).to(dt) for dt in (torch.bfloat16, torch.float16, torch.float32, torch.int64)]
    masks += [m.astype(np.float16), m.astype(np.float32), m.astype(np.uint8)]
    for mask in masks:
        p = pack_batch(lp, mask=mask, advantages=[1.0, -1.0])
        assert p.layout.offsets.tolist() == want.layout.offsets.tolist() == [0, 3, 5]
        assert p.token["mask"].tolist() == want.token["mask"].tolist() == [True, False, True, True, True]
    ragged = pack_batch(
        lp.reshape(-1), offsets=[0, 4, 8], mask=torch.ones(8, dtype=torch.bfloat16), advantages=[1, 2]
    )
    assert "mask" in ragged.token and ragged.token["mask"].all()


def test_what_is_not_an_array_a_mask_or_a_sum_is_refused_by_name() -> None:
    """Found probing the client: numpy's own error for nested lists of unequal lengths, a
    string mask taken as all ones, lengths whose int64 sum wraps blamed on logp."""
    field, desc = refusal(lambda: pack_batch([[-0.1, -0.2], [-0.3]], lengths=[2, 1], advantages=[1, 2]))
    assert field == "batch.logp" and desc.startswith("bad_shape: not an array")
    strings = np.array([["a", "b"], ["c", "d"]])
    assert refusal(lambda: pack_batch(-np.ones((2, 2), np.float32), mask=strings, advantages=[1, 2])) == (
        "batch.mask",
        "bad_dtype: <U1; expected bool or numbers 0 and 1",
    )
    lp = -np.ones(3, np.float32)
    assert refusal(lambda: pack_batch(lp, lengths=[2**62, 2**62], advantages=[1, 2])) == (
        "batch.lengths",
        "bad_sum: they sum to 9223372036854775808; logp has 3 tokens",
    )
    assert refusal(lambda: pack_batch(lp, lengths=[1, 1], advantages=[1, 2]))[1].startswith(
        "bad_sum: they sum to 2;"
    )
    # a wrapped int64 sum landing on the token count itself (it went through, and the server
    # blamed batch.offsets[2], a field the caller never sent; an audit)
    m = 2**63 - 1
    assert refusal(
        lambda: pack_batch(-np.ones(4, np.float32), lengths=[m, m, 2, 4], advantages=[1, 2, 3, 4])
    ) == (
        "batch.lengths",
        f"bad_sum: they sum to {2 * m + 6}; logp has 4 tokens",
    )


def test_offsets_not_ending_at_the_token_count_are_named_as_the_engine_names_them() -> None:
    # found by an audit: refused as `batch.logp: bad_shape`, naming the field that was right
    lp = -np.ones(10, np.float32)
    assert refusal(lambda: pack_batch(lp, offsets=[0, 4, 8], advantages=[1, 2])) == (
        "batch.offsets[2]",
        "bad_offsets: offsets[-1] = 8, must equal the number of tokens 10",
    )


def test_a_ragged_per_token_input_must_have_logps_token_count() -> None:
    """A ragged old_logp of 2 tokens for a logp of 3 is refused by the client, not sent."""
    lp = -np.ones(3, np.float32)
    assert refusal(lambda: pack_batch(lp, -np.ones(2, np.float32), offsets=[0, 1, 3], advantages=[1, 2])) == (
        "batch.old_logp",
        "bad_shape: (2,); expected (3,)",
    )


@pytest.mark.parametrize(
    "level, adv, expected",
    [
        ("token", np.ones(3), "bad_shape: (3,); expected (3, 4) per token (advantage_level='token')"),
        (
            "sequence",
            np.ones((3, 4)),
            "bad_shape: (3, 4); expected (3,) per sequence (advantage_level='sequence')",
        ),
        (None, np.ones(5), "bad_shape: (5,); expected (3,) per sequence or (3, 4) per token"),
    ],
)
def test_a_padded_batchs_advantages_refusal_says_what_the_level_asks(level, adv, expected) -> None:
    """With advantage_level given, the refusal names the shape that level needs (it named the
    shape given as the one expected, or a flat (N,) a padded batch never takes; an audit)."""
    lp = -np.ones((3, 4), np.float32)
    assert refusal(lambda: pack_batch(lp, advantages=adv, advantage_level=level)) == (
        "batch.advantages",
        expected,
    )


@pytest.mark.parametrize(
    "dtype", ["bfloat16", "float8_e4m3fn", "float8_e5m2", "float8_e4m3", "float6_e2m3fn", "float4_e2m1fn"]
)
def test_jax_half_dtypes_get_what_torch_half_tensors_get(inprocess_server, dtype) -> None:
    """JAX's arrays carry ml_dtypes' bfloat16 and float8 (numpy kind "V", not "f"): they were a
    bare `bad_dtype` where torch's get `half_precision` and its advice, and a JAX trainer's bf16
    rewards and 0 / 1 mask were refused though they are exact in float32 (an audit)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    half = np.dtype(getattr(ml_dtypes, dtype))
    lp = -np.ones((2, 3), np.float32)
    for name in ("logp", "old_logp", "advantages"):
        adv = np.array([1.0, -1.0]).astype(half) if name == "advantages" else [1.0, -1.0]
        args = [lp.astype(half) if name == "logp" else lp, lp.astype(half) if name == "old_logp" else lp]
        field, why = refusal(lambda args=args, adv=adv: pack_batch(*args, advantages=adv))
        assert field == f"batch.{name}", (field, why)
        assert why.startswith(f"half_precision: {name} is {dtype}; send {name} as float32 or float64"), why
    field, why = refusal(
        lambda: pack_batch(lp.reshape(-1), lengths=np.array([2, 4]).astype(half), advantages=[1, 2])
    )
    assert field == "batch.lengths" and why.startswith("half_precision") and "as integers" in why
    m = np.array([[1, 0, 1], [1, 1, 0]])
    got = pack_batch(lp, mask=m.astype(half), advantages=[1.0, -1.0])
    assert got.layout.offsets.tolist() == [0, 3, 5]
    assert got.token["mask"].tolist() == [True, False, True, True, True]
    client = SoftgateClient(inprocess_server().target)
    r, gids = [1.0, 0.0, 0.5, 1.5], [0, 0, 1, 1]  # (exact in every half type)
    got, exact = (
        client.advantages(np.array(r).astype(half), gids),
        client.advantages(np.array(r, np.float32), gids),
    )
    assert got.advantages.tolist() == exact.advantages.tolist()


@pytest.mark.parametrize("half", [np.float16, torch.float16, torch.bfloat16])
def test_half_precision_lengths_are_refused_from_numpy_as_from_torch(half) -> None:
    """A half mask's row sums round past 256 / 2048: refused as integers are asked for, from
    numpy as from torch (numpy's float16 was taken as it came; an audit)."""
    lp = -np.ones(6, np.float32)
    lengths = np.array([2, 4], half) if isinstance(half, type) else torch.tensor([2, 4], dtype=half)
    field, why = refusal(lambda: pack_batch(lp, lengths=lengths, advantages=[1, 2]))
    assert field == "batch.lengths" and why.startswith("half_precision") and "as integers" in why


def test_integer_inputs_keep_their_digits_in_a_float64_batch() -> None:
    """Integers went through float32 before the batch's float64: 16777217 arrived as 16777216
    (an audit); logp's own integers still make a float32 batch."""
    big = 2**24 + 1
    p = pack_batch(np.full((2, 3), -1.0), advantages=np.array([big, -3]), ref_logp=np.full((2, 3), -big))
    assert p.seq["advantages"].dtype == np.float64 and int(p.seq["advantages"][0]) == big
    assert int(p.token["ref_logp"][0]) == -big
    p = pack_batch(np.full((2, 3), -1), advantages=np.array([1, -3]))
    assert p.token["logp"].dtype == p.seq["advantages"].dtype == np.float32


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_half_precision_group_ids_are_told_to_come_as_integers(half) -> None:
    """The advice was `.float()`, which the next call refuses as bad_dtype (an audit)."""
    lp = -np.ones((4, 3), np.float32)
    gids = torch.tensor([0, 0, 1, 1]).to(half)
    field, why = refusal(lambda: pack_batch(lp, rewards=[1, 0, 1, 0], group_ids=gids))
    assert field == "batch.group_ids" and why.startswith("half_precision") and "`.long()`" in why
    assert ".float()" not in why
    pack_batch(lp, rewards=[1, 0, 1, 0], group_ids=gids.long())  # (the advice works)


def test_a_scalar_ragged_mask_is_refused_by_shape() -> None:
    """A 0-d mask for a ragged logp is a bad_shape refusal (not an IndexError)."""
    lp = -np.ones(3, np.float32)
    assert refusal(lambda: pack_batch(lp, offsets=[0, 3], mask=np.array(True), advantages=[1])) == (
        "batch.mask",
        "bad_shape: (); expected (3,)",
    )


def test_a_negative_ragged_length_is_refused_even_when_the_lengths_sum_to_the_tokens() -> None:
    """Ragged lengths [-1, 3] sum to logp's 2 tokens but are refused as negative, not sent as offsets."""
    lp = -np.ones(2, np.float32)
    assert refusal(lambda: pack_batch(lp, lengths=[-1, 3], advantages=[1, 2])) == (
        "batch.lengths[0]",
        "negative",
    )


def test_offsets_and_lengths_must_be_whole_numbers() -> None:
    lp = -np.ones(3, np.float32)
    assert refusal(lambda: pack_batch(lp, offsets=np.array([0, 1.7, 3]), advantages=[1, 2])) == (
        "batch.offsets[1]",
        "not_integer: 1.7",
    )
    assert refusal(lambda: pack_batch(lp[:2], lengths=np.array([1.0, 1.1]), advantages=[1, 2])) == (
        "batch.lengths[1]",
        "not_integer: 1.1",
    )
    assert (
        refusal(lambda: pack_batch(lp[:2], lengths=[1.0, np.nan], advantages=[1, 2]))[0] == "batch.lengths[1]"
    )
    assert refusal(lambda: pack_batch(lp, lengths=["1", "2"], advantages=[1, 2]))[1].startswith("bad_dtype")
    # whole numbers in floats (e.g. a float mask's row sums) are taken as they are
    assert pack_batch(lp, offsets=np.array([0.0, 1.0, 3.0]), advantages=[1, 2]).layout.offsets.tolist() == [
        0,
        1,
        3,
    ]
    pad = pack_batch(-np.ones((2, 3), np.float32), lengths=torch.tensor([3.0, 1.0]), advantages=[1, 2])
    assert pad.layout.offsets.tolist() == [0, 3, 4] and pad.layout.offsets.dtype == np.int64
    # bool lengths are integers too (0 / 1 token), not a bad_dtype
    p = pack_batch(-np.ones(2, np.float32), lengths=np.array([True, False, True]), advantages=[1, 2, 3])
    assert p.layout.offsets.tolist() == [0, 1, 1, 2]


def test_big_endian_arrays_travel_like_little_endian_ones() -> None:
    rng = np.random.default_rng(0)
    lp, old = -rng.random((3, 4)), -rng.random((3, 4))
    mask = np.ones((3, 4), bool)
    mask[1, 2:] = False
    kw = {"rewards": np.array([1.0, 0.0, 1.0]), "group_ids": np.array([0, 0, 1]), "mask": mask}
    little = pack_batch(lp.astype("<f4"), old.astype("<f4"), **kw).pieces().join()
    big = {"rewards": kw["rewards"].astype(">f8"), "group_ids": kw["group_ids"].astype(">i8"), "mask": mask}
    assert pack_batch(lp.astype(">f4"), old.astype(">f4"), **big).pieces().join() == little
    ragged = pack_batch(
        lp.reshape(-1).astype(">f8"), lengths=np.array([4, 4, 4], ">i4"), advantages=[1, 2, 3]
    )
    assert ragged.token["logp"].dtype == np.float64 and ragged.layout.offsets.tolist() == [0, 4, 8, 12]


def test_configuration_mistakes_are_invalid_argument_errors(client) -> None:
    lp = -np.ones(3, np.float32)
    kw = {"lengths": [3], "advantages": [1.0]}
    field, desc = refusal(lambda: client.loss(lp, **kw, objective="ppo"))
    assert field == "config.objective" and desc.startswith("unknown_choice: 'ppo'; one of ['sapo', ")
    field, desc = refusal(lambda: client.loss(lp, **kw, objective="grpo", tau_pos=1.0))
    assert field == "config.objective.grpo.tau_pos" and desc.startswith("unexpected: grpo takes ['eps_low'")
    assert refusal(lambda: client.loss(lp, **kw, outputs=("ratio", "nope")))[0] == "outputs"
    # a bad scale is named as the scale, not as the estimator beside it
    assert refusal(lambda: client.loss(lp, **kw, estimator="grpo", scale="rows")) == (
        "config.advantages.scale",
        "unknown_choice: 'rows'; one of ['group', 'batch', 'none', 'leave_one_out']",
    )
    assert (
        refusal(lambda: cfg.Objective("reinforce", {"eps_low": 0.2}))[0]
        == "config.objective.reinforce.eps_low"
    )
    with pytest.raises(TypeError, match="unknown loss option"):  # a misspelt keyword stays a TypeError
        client.loss(lp, **kw, tau_post=1.0)


def test_stream_violations_are_named_in_the_whole_batch() -> None:
    """`_unchunked`: a chunk's per-token index counts from the chunk's first token, a per-sequence
    one from its first sequence; what names no chunk element stays as the server sent it."""
    from softgate_client.client import _unchunked
    from softgate_client.errors import FieldViolation

    packed = pack_batch(
        -np.ones(10, np.float32), offsets=[0, 3, 5, 5, 10], rewards=np.ones(4), group_ids=[0, 0, 1, 1]
    )
    bounds = [(0, 2), (2, 4)]  # chunk 1 starts at sequence 2, token 5
    sent = [
        ("chunk[1].logp[2]", "batch.logp[7]"),
        ("chunk[1].rewards[1]", "batch.rewards[3]"),
        ("chunk[1].offsets[2]", "batch.offsets[4]"),
        ("chunk.group_ids", "batch.group_ids"),
        ("chunk[0].advantage_level", "batch.advantage_level"),
        ("config.objective.sapo.tau_pos", "config.objective.sapo.tau_pos"),
        ("chunk[7].logp[0]", "chunk[7].logp[0]"),  # not a chunk this client sent
    ]
    e = InvalidArgumentError("invalid input", violations=[FieldViolation(f, "r: why") for f, _ in sent])
    out = _unchunked(e, packed, bounds)
    assert [v.field for v in out.violations] == [want for _, want in sent]
    assert out.violations[0].description == "r: why (in chunk[1].logp[2] of the stream)"
    assert out.violations[-1].description == "r: why" and out.details == "invalid input"


def test_a_streamed_batchs_message_lists_the_violations_as_renamed() -> None:
    """The message line (`str(err)`'s first) named the chunk's place (`chunk[1].logp[2]`) while
    the violations below it named the batch's (`batch.logp[7]`); a violation the server's message
    limit cut off stays as it is."""
    from softgate_client.client import _unchunked
    from softgate_client.errors import FieldViolation

    packed = pack_batch(-np.ones(10, np.float32), offsets=[0, 3, 5, 5, 10], advantages=np.ones(4))
    vs = [
        FieldViolation("chunk[1].logp[2]", "non_finite: value is NaN"),
        FieldViolation("chunk[1].logp[3]", "x"),
    ]
    e = InvalidArgumentError(
        "invalid input: chunk[1].logp[2]: non_finite: value is NaN; chunk[1].lo...", violations=vs
    )
    out = _unchunked(e, packed, [(0, 2), (2, 4)])
    head = "invalid input: batch.logp[7]: non_finite: value is NaN (in chunk[1].logp[2] of the stream)"
    assert out.details == f"{head}; chunk[1].lo..."
    assert str(out).splitlines()[0] == f"INVALID_ARGUMENT: {out.details}"


def test_a_float_that_overflows_logps_dtype_is_refused_not_sent_as_infinity() -> None:
    """Every float travels in logp's dtype: a finite float64 1e39 with a float32 logp went as
    inf, refused as `non_finite` though given finite, after numpy's overflow warning (an audit)."""
    lp = -np.ones(2, np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy RuntimeWarning on the way
        assert refusal(lambda: pack_batch(lp, lengths=[1, 1], advantages=np.array([1e39, 1.0]))) == (
            "batch.advantages[0]",
            "overflow: 1e+39 does not fit in float32, logp's dtype",
        )
        old = np.full((2, 3), -1.0)
        old[1, 2] = -1e39
        field, why = refusal(lambda: pack_batch(-np.ones((2, 3), np.float32), old, advantages=[1, 2]))
        assert field == "batch.old_logp[5]" and why.endswith("(row 1, column 2 of the padded input)")
        # what does not travel (padding past the last mask = 1) is not checked; an infinity given
        # is the server's to refuse (non_finite); float64 logp keeps float64 inputs as they are
        mask = np.array([[1, 1, 1], [1, 0, 0]])
        assert pack_batch(-np.ones((2, 3), np.float32), old, mask=mask, advantages=[1, 2])
        assert pack_batch(lp, np.array([-np.inf, -1.0]), lengths=[1, 1], advantages=[1, 2])
        p = pack_batch(lp.astype(np.float64), lp, lengths=[2], advantages=np.array([1e39]))
        assert p.token["old_logp"].dtype == p.seq["advantages"].dtype == np.float64


def test_masked_arrays_and_sparse_tensors_are_refused_by_name() -> None:
    """A masked array's mask was dropped and its `.data` crashed the wire encoder
    (AttributeError); a sparse tensor raised torch's own TypeError (an audit)."""
    lp = -np.ones(2, np.float32)
    masked = np.ma.masked_array(lp, mask=[0, 1])
    field, why = refusal(lambda: pack_batch(masked, lengths=[2], advantages=[1.0]))
    assert field == "batch.logp" and why.startswith("bad_type: a numpy masked array") and "filled" in why
    assert refusal(lambda: pack_batch(lp, masked, lengths=[2], advantages=[1.0]))[0] == "batch.old_logp"
    sparse = torch.from_numpy(lp).to_sparse()
    assert refusal(lambda: pack_batch(sparse, lengths=[2], advantages=[1.0])) == (
        "batch.logp",
        "bad_type: a torch.sparse_coo tensor; pass a dense one (`.to_dense()`)",
    )


@pytest.mark.filterwarnings("ignore:the matrix subclass:PendingDeprecationWarning")
def test_ndarray_subclasses_pack_as_plain_arrays(tmp_path) -> None:
    """Found by an audit: an np.matrix logp indexed to a [1, K] matrix, sent with shape [1]
    (the server's `shape_mismatch`); a memmap still travels without a copy."""
    rng = np.random.default_rng(0)
    lp = -rng.random((3, 5)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 1, 0, 0]], bool)
    kw = {"mask": mask, "rewards": [1.0, 0.0, 1.0], "group_ids": [0, 0, 0]}
    want = pack_batch(lp, lp, **kw)
    got = pack_batch(np.matrix(lp), np.matrix(lp), **kw)
    for name in ("logp", "old_logp", "mask"):
        assert type(got.token[name]) is np.ndarray and got.token[name].shape == want.token[name].shape
        np.testing.assert_array_equal(got.token[name], want.token[name])
    mm = np.lib.format.open_memmap(tmp_path / "lp.npy", mode="w+", dtype=np.float32, shape=(15,))
    mm[:] = lp.ravel()
    p = pack_batch(mm, lengths=[15], advantages=[1.0])
    assert type(p.token["logp"]) is np.ndarray and np.shares_memory(p.token["logp"], mm)


@pytest.mark.parametrize(
    "kw, field",
    [
        ({"tau_pos": "abc"}, "config.objective.sapo.tau_pos"),
        ({"num_tokens": "abc"}, "config.aggregation.num_tokens"),
        ({"num_tokens": torch.tensor([1.0, 2.0])}, "config.aggregation.num_tokens"),
        ({"kl_beta": [0.1]}, "config.kl.beta"),
        ({"kl_beta": 0.1, "kl_value_clamp": True}, "config.kl.value_clamp"),  # (was sent as 1.0)
        ({"mismatch_cap": False}, "config.mismatch.cap"),
        ({"log_ratio_clamp": object()}, "config.log_ratio_clamp"),
        ({"outputs": 1}, "outputs"),
        ({"config": {"objective": "grpo"}}, "config"),
        ({"kl": 0.1}, "config.kl"),
    ],
)
def test_a_wrong_typed_option_is_refused_by_its_name(client, kw, field) -> None:
    """These raised Python's own ValueError / TypeError / AttributeError, naming no option (an audit)."""
    got, why = refusal(lambda: client.loss(-np.ones(1, np.float32), lengths=[1], advantages=[1.0], **kw))
    assert got == field and why.startswith("bad_type: expected"), why


def test_an_int_past_float64s_range_is_refused_by_its_name(client) -> None:
    """10**400 raised OverflowError from float() in the client (and from math.isfinite in the
    engine): a traceback naming no option (a review)."""
    lp = -np.ones(1, np.float32)
    got = refusal(lambda: client.loss(lp, lengths=[1], advantages=[1.0], kl_beta=0.1, kl_value_clamp=10**400))
    assert got[0] == "config.kl.value_clamp" and got[1].startswith("out_of_range:"), got


def test_a_bool_where_a_number_goes_is_refused_whatever_came_before() -> None:
    """The client refuses True for a number (the server does); a remembered configuration built
    from 1.0 answered for True (True == 1.0, the same hash: a review), and numpy's and torch's
    bools inside reward_weights went as 1.0 and 0.0."""
    from softgate_client.client import _loss_config

    assert _loss_config(None, {"kl_beta": 1.0, "kl_estimator": "k3"}).kl == cfg.KLConfig("k3", 1.0)
    assert refusal(lambda: _loss_config(None, {"kl_beta": True, "kl_estimator": "k3"}))[0] == "config.kl.beta"
    # inside a tuple too ((True,) == (1,): an audit)
    assert _loss_config(None, {"reward_weights": (1,)}).advantages.reward_weights == (1.0,)
    got = refusal(lambda: _loss_config(None, {"reward_weights": (True,)}))
    assert got[0] == "config.advantages.reward_weights" and "expected a number" in got[1], got
    # a tensor inside a tuple is read each time, never remembered by identity
    w = torch.tensor(0.5)
    assert _loss_config(None, {"reward_weights": (w, 1.0)}).advantages.reward_weights == (0.5, 1.0)
    w.fill_(2.0)
    assert _loss_config(None, {"reward_weights": (w, 1.0)}).advantages.reward_weights == (2.0, 1.0)
    for w in ([np.bool_(True)], [torch.tensor(True)], [np.array(True)], [1.0, np.False_]):
        got = refusal(lambda w=w: cfg.AdvantageConfig(reward_weights=w))
        assert got[0] == "config.advantages.reward_weights" and "expected a number" in got[1], w
    assert cfg.AdvantageConfig(reward_weights=[np.float32(0.5), torch.tensor(2.0)]).reward_weights == (
        0.5,
        2.0,
    )


def test_wrong_typed_configuration_objects_are_refused_by_name(client) -> None:
    assert refusal(lambda: cfg.sapo(tau_pos="x"))[0] == "config.objective.sapo.tau_pos"
    assert refusal(lambda: cfg.LossConfig(aggregation="token_mean"))[0] == "config.aggregation"
    assert refusal(lambda: client.advantages([1.0, 0.0], [0, 0], config={"estimator": "rloo"}))[0] == "config"
    # numbers given as strings (PyYAML reads `1e-3` as one) are still read as numbers
    assert cfg.build_loss_config(tau_pos="1.5", num_tokens="1e3").aggregation.num_tokens == 1000.0


def test_unsigned_integers_past_int64_are_refused_not_wrapped(client) -> None:
    """uint64 rewards >= 2**63 went as negative int64 (the advantages' signs flipped) and a
    uint64 length of 2**64 - 1 was refused as `negative` (an audit)."""
    big = np.array([2**63 + 10, 0], np.uint64)
    assert refusal(lambda: client.advantages(big, [0, 0])) == (
        "rewards[0]",
        "out_of_range: 9223372036854775818 does not fit in int64",
    )
    lp = -np.ones(2, np.float32)
    assert (
        refusal(lambda: pack_batch(lp, lengths=[1, 1], rewards=[1, 0], group_ids=big))[0]
        == "batch.group_ids[0]"
    )
    huge = np.array([2**64 - 1, 3], np.uint64)
    assert refusal(lambda: pack_batch(lp, lengths=huge, advantages=[1, 2])) == (
        "batch.lengths[0]",
        "out_of_range: 18446744073709551615 does not fit in int64",
    )
    assert refusal(lambda: pack_batch(lp, offsets=np.array([0, 2**63, 2], np.uint64), advantages=[1, 2]))[
        0
    ] == ("batch.offsets[1]")
    # a whole float past int64 is out of range, not `not_integer`
    assert refusal(lambda: pack_batch(lp, offsets=[0.0, 1e30, 2.0], advantages=[1, 2])) == (
        "batch.offsets[1]",
        "out_of_range: 1e+30 does not fit in int64",
    )
    p = pack_batch(
        lp, lengths=np.array([1, 1], np.uint64), rewards=np.array([3, 0], np.uint64), group_ids=[0, 0]
    )
    assert p.seq["rewards"].tolist() == [3, 0] and p.layout.offsets.tolist() == [0, 1, 2]


@pytest.mark.parametrize("kind", ["numpy", "torch", "bfloat16"])
def test_a_nan_in_a_float_mask_is_refused_as_the_engine_refuses_it(kind) -> None:
    """NaN != 0 made a NaN mask value a trained token; the engine refuses it (`bad_mask`; an audit)."""

    def mask(m: np.ndarray):
        if kind == "numpy":
            return m
        return torch.from_numpy(m).to(torch.float32 if kind == "torch" else torch.bfloat16)

    lp = -np.ones(2, np.float32)
    ragged = mask(np.array([1.0, np.nan], np.float32))
    assert refusal(lambda: pack_batch(lp, lengths=[2], mask=ragged, advantages=[1.0])) == (
        "batch.mask[1]",
        "bad_mask: nan; a mask value is 0 (not trained) or 1 (trained)",
    )
    padded = mask(np.array([[1.0, 1.0], [np.nan, 0.0]], np.float32))
    field, why = refusal(lambda: pack_batch(-np.ones((2, 2), np.float32), mask=padded, advantages=[1, 2]))
    assert (field, why.split(":")[0]) == ("batch.mask", "bad_mask") and why.endswith(
        "(row 1, column 0 of the padded input)"
    )
    # +inf and -inf are neither 0 nor 1 either
    infs = mask(np.array([1.0, -np.inf], np.float32))
    assert refusal(lambda: pack_batch(lp, lengths=[2], mask=infs, advantages=[1.0])) == (
        "batch.mask[1]",
        "bad_mask: -inf; a mask value is 0 (not trained) or 1 (trained)",
    )


def test_offsets_and_lengths_together_are_refused() -> None:
    """Both given: lengths were silently ignored, even when they disagreed (an audit); one is enough."""
    lp = -np.ones(6, np.float32)
    for lengths in ([5, 1], [2, 4]):
        assert refusal(lambda: pack_batch(lp, offsets=[0, 2, 6], lengths=lengths, advantages=[1, 2])) == (  # noqa: B023
            "batch.lengths",
            "unexpected: ragged logp takes offsets or lengths, not both",
        )


@pytest.mark.parametrize("stream", [False, True])
def test_bad_offsets_are_refused_before_the_level_is_inferred_or_the_stream_cut(client, stream) -> None:
    """Decreasing offsets with B == N were blamed on the advantages (`ambiguous`), and a streamed
    call reported a second violation, an artifact of cutting the invalid batch into chunks;
    the engine's reasons, in its order, for either RPC (an audit)."""
    lp = -np.ones(3, np.float32)
    adv = np.array([1.0, -1.0, 0.5], np.float32)
    assert refusal(lambda: client.loss(lp, offsets=[0, 3, 2, 3], advantages=adv, stream=stream)) == (
        "batch.offsets[2]",
        "bad_offsets: offsets must be non-decreasing",
    )
    six = -np.ones(6, np.float32)
    assert refusal(
        lambda: client.loss(
            six, offsets=[0, 4, 3, 6], advantages=adv, advantage_level="sequence", stream=stream
        )
    ) == ("batch.offsets[2]", "bad_offsets: offsets must be non-decreasing")
    assert refusal(lambda: client.loss(lp, offsets=[1, 2, 3], advantages=[1, 2], stream=stream)) == (
        "batch.offsets[0]",
        "bad_offsets: offsets[0] = 1, must be 0",
    )


@pytest.mark.parametrize("name", ["logp", "old_logp", "ref_logp", "rollout_logp"])
def test_half_precision_log_probs_are_sent_for_from_float32_logits(name) -> None:
    """The refusal of bf16 log-probs advised `.float()`, which passes the check and keeps the
    bf16 rounding (a 7e-2 ratio error; on-policy GSPO then clipped every token; an audit). The
    advice is float32 logits, or float32 logprobs from the sampler for old / rollout ones."""
    lp = -np.ones((2, 3), np.float32)
    half = torch.full((2, 3), -1.0, dtype=torch.bfloat16)
    kw = {"advantages": [1.0, -1.0], **({} if name == "logp" else {name: half})}
    field, why = refusal(lambda: pack_batch(half if name == "logp" else lp, **kw))
    assert field == f"batch.{name}"
    assert why.startswith(f"half_precision: {name} is bfloat16; send {name} as float32 or float64"), why
    assert "`logits.float().log_softmax(-1)`" in why
    assert "`.float()` on bfloat16 log-probs keeps their rounding" in why
    assert ("ask the sampler for float32 logprobs" in why) == (name in ("old_logp", "rollout_logp"))
    # advantages and rewards are values, not rounded log-probs: `.float()` is the right advice there
    _, why = refusal(lambda: pack_batch(lp, advantages=torch.ones(2, dtype=torch.bfloat16)))
    assert (
        why
        == "half_precision: advantages is bfloat16; send advantages as float32 or float64 (e.g. `.float()`)"
    )


def test_padded_lengths_that_cut_trained_tokens_are_refused() -> None:
    """`lengths=mask.sum(-1)` beside a mask with a tool-output gap cut each such row short: its
    last trained tokens went unsent, with zero gradient and a smaller N_tok (an audit). lengths
    is where a row ends, not a count of trained tokens."""
    lp = -np.ones((3, 8), np.float32)
    mask = np.zeros((3, 8), bool)
    mask[0, :3] = True
    mask[1, [0, 1, 5, 6, 7]] = True  # tool output masked at columns 2..4
    mask[2, :6] = True
    field, why = refusal(lambda: pack_batch(lp, mask=mask, lengths=mask.sum(-1), advantages=[1, 2, 3]))
    assert (field, why) == (
        "batch.lengths",
        "cuts_trained_tokens: row 1 has mask = 1 at column 5 >= lengths[1] = 5 "
        "(lengths is where a row ends, not how many tokens are trained)",
    )
    # lengths at or past each row's last trained token: the tokens the mask alone sends
    ends = np.array([3, 8, 7])
    p = pack_batch(lp, mask=mask, lengths=ends, advantages=[1, 2, 3])
    assert p.layout.offsets.tolist() == [0, 3, 11, 18]
    assert int(p.token["mask"].sum()) == int(mask.sum())


def test_a_kl_estimator_without_beta_is_refused(client) -> None:
    """`kl_estimator="k2"` with ref_logp and no kl_beta computed no KL term at all (beta
    defaults to 0): kl_loss 0.0 without a word (an audit)."""
    lp = -np.ones((2, 3), np.float32)
    why = (
        "missing: a KL estimator ('k2') was set without beta, which defaults to 0 (no KL term); pass kl_beta"
    )
    kw = {"advantages": [1.0, -1.0], "ref_logp": lp}
    assert refusal(lambda: client.loss(lp, kl_estimator="k2", **kw)) == ("config.kl.beta", why)
    assert refusal(lambda: client.loss(lp, kl=cfg.KLConfig("k2"), **kw)) == ("config.kl.beta", why)
    assert refusal(lambda: cfg.LossConfig(kl=cfg.KLConfig("k2"))) == ("config.kl.beta", why)
    # a beta given, 0 included (a KL term scheduled off), or a section whole then its beta: fine
    assert cfg.build_loss_config(kl_estimator="k2", kl_beta=0.0).kl == cfg.KLConfig("k2", 0.0)
    assert cfg.build_loss_config(kl=cfg.KLConfig("k2"), kl_beta=0.5).kl == cfg.KLConfig("k2", 0.5)
    assert cfg.build_loss_config(kl=cfg.KLConfig()).kl is None
    # a bound alone was dropped with the empty section: no KL term and not a word
    why = "missing: a KL value_clamp (10.0) was set without beta, which defaults to 0 (no KL term); pass kl_beta"
    assert refusal(lambda: client.loss(lp, kl_value_clamp=10, **kw)) == ("config.kl.beta", why)
    why = (
        "missing: a KL value_clamp (10.0) was set without beta, which defaults to 0 (no KL in the reward); "
        "pass reward_kl_beta"
    )
    assert refusal(lambda: cfg.build_loss_config(reward_kl_value_clamp=10)) == ("config.reward_kl.beta", why)


def test_per_sequence_advantages_as_a_column_are_told_to_squeeze() -> None:
    """advantages [B, 1] (TRL's `advantages.unsqueeze(1)`) got a message naming the per-token
    shape only (an audit): it names both shapes, and the squeeze."""
    lp = -np.ones((3, 4), np.float32)
    assert refusal(lambda: pack_batch(lp, advantages=np.ones((3, 1)))) == (
        "batch.advantages",
        "bad_shape: (3, 1); expected (3,) per sequence or (3, 4) per token "
        "(pass advantages.squeeze(-1) for one per sequence)",
    )
    assert refusal(lambda: pack_batch(lp, advantages=np.ones((3, 5)))) == (
        "batch.advantages",
        "bad_shape: (3, 5); expected (3,) per sequence or (3, 4) per token",
    )
