"""Client-side array plumbing and configuration (no server needed)."""

from __future__ import annotations

import numpy as np
import pytest
from softgate_client import config as cfg
from softgate_client._tensors import ArrayInputError, from_le_bytes, le_bytes, make_layout, to_numpy
from softgate_client.client import _loss_config, loss_config_to_proto, pack_batch


def test_le_bytes_roundtrip_and_byteorder() -> None:
    a = np.arange(10, dtype=np.float32) / 3
    assert le_bytes(a) == a.astype("<f4").tobytes()
    big = a.astype(">f4")
    assert le_bytes(big) == a.astype("<f4").tobytes()
    back = from_le_bytes(le_bytes(a), np.float32)
    np.testing.assert_array_equal(back, a)
    # non-contiguous input
    m = np.arange(20, dtype=np.float64).reshape(4, 5)[:, 1]
    np.testing.assert_array_equal(from_le_bytes(le_bytes(m), np.float64), m)
    with pytest.raises(ValueError):
        from_le_bytes(b"abc", np.float32)


def test_padded_layout_drops_trailing_padding_keeps_interior_mask() -> None:
    logp = np.arange(12, dtype=np.float32).reshape(3, 4)
    mask = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]], dtype=np.float32)
    lay = make_layout(logp, mask=mask)
    assert lay.offsets.tolist() == [0, 2, 5, 5]
    assert lay.flatten(logp, "logp").tolist() == [0, 1, 4, 5, 6]
    assert lay.mask is not None and lay.mask.tolist() == [True, True, True, False, True]
    back = lay.unflatten(np.array([1, 2, 3, 4, 5], dtype=np.float32))
    assert back.tolist() == [[1, 2, 0, 0], [3, 4, 5, 0], [0, 0, 0, 0]]


def test_padded_layout_prefix_mask_sends_no_mask() -> None:
    logp = np.zeros((2, 3), dtype=np.float32)
    lay = make_layout(logp, mask=np.array([[True, True, False], [True, False, False]]))
    assert lay.mask is None
    assert lay.offsets.tolist() == [0, 2, 3]


def test_padded_without_mask_is_full_grid_without_copy() -> None:
    logp = np.ones((2, 3), dtype=np.float64)
    lay = make_layout(logp)
    assert lay.valid is None and lay.mask is None
    assert lay.offsets.tolist() == [0, 3, 6]
    flat = lay.flatten(logp, "logp")
    assert np.shares_memory(flat, logp)
    assert lay.unflatten(flat).shape == (2, 3)


def test_padded_with_lengths() -> None:
    logp = np.arange(6, dtype=np.float32).reshape(2, 3)
    lay = make_layout(logp, lengths=[1, 3])
    assert lay.offsets.tolist() == [0, 1, 4]
    assert lay.flatten(logp, "logp").tolist() == [0, 3, 4, 5]


def test_ragged_layout() -> None:
    logp = np.zeros(5, dtype=np.float32)
    assert make_layout(logp, lengths=[2, 0, 3]).offsets.tolist() == [0, 2, 2, 5]
    assert make_layout(logp, offsets=np.array([0, 5])).offsets.tolist() == [0, 5]
    with pytest.raises(ArrayInputError, match="offsets"):
        make_layout(logp)
    with pytest.raises(ArrayInputError, match="mask"):
        make_layout(logp, lengths=[5], mask=np.ones(4))


def test_shape_errors_name_the_field() -> None:
    lay = make_layout(np.zeros((2, 3), np.float32))
    with pytest.raises(ArrayInputError, match=r"old_logp: bad_shape"):
        lay.flatten(np.zeros((2, 4), np.float32), "old_logp")


def test_torch_inputs_and_half_precision_refused() -> None:
    torch = pytest.importorskip("torch")
    t = torch.arange(4, dtype=torch.float32, requires_grad=True)
    a = to_numpy(t, "logp")
    assert a.dtype == np.float32 and a.tolist() == [0, 1, 2, 3]
    with pytest.raises(ArrayInputError, match="half_precision"):
        to_numpy(t.to(torch.bfloat16), "logp")
    with pytest.raises(ArrayInputError, match="mask: bad_device: a meta tensor"):  # (not torch's
        to_numpy(torch.ones(3, device="meta"), "mask")  # NotImplementedError; an audit)


def test_an_integer_logp_is_widened_to_float32() -> None:
    """An integer logp travels as float32, not float64, and the batch's other floats with it."""
    p = pack_batch([[-1, -2], [-3, -4]], advantages=[1.0, 2.0])
    assert p.token["logp"].dtype == np.float32 and p.seq["advantages"].dtype == np.float32


@pytest.mark.parametrize(
    "verl, estimator, bound",
    [
        ("kl", "k1", None),
        ("k1", "k1", None),
        ("abs", "abs", None),
        ("mse", "k2", None),
        ("k2+", "k2", None),  # (verl's k2+ is k2: its own gradient)
        ("low_var_kl", "k3", 10.0),
        ("k3", "k3", 10.0),
        ("k1+", "k1_st", None),
        ("abs+", "abs_st", None),
        ("low_var_kl+", "k3_st", 10.0),
    ],
)
def test_verl_kl_types_map_to_an_estimator_and_its_bound(
    verl: str, estimator: str, bound: float | None
) -> None:
    """verl's kl_loss_type / kl_penalty names: the estimator, and low_var_kl's bound of 10 on
    its value (the part a port forgets: tests/test_engine.py checks the bounded k3 against
    verl's kl_penalty). In the reward a "+" type is its base (no gradient), its level token
    under reinforce_plus_plus alone (verl's per-token return), else sequence."""
    assert cfg.kl_from_verl(verl, 0.001) == cfg.KLConfig(estimator, 0.001, value_clamp=bound)
    rk = cfg.reward_kl_from_verl(verl, 0.02, "grpo")
    assert rk == cfg.RewardKLConfig(0.02, estimator.removesuffix("_st"), "sequence", value_clamp=bound)
    assert cfg.reward_kl_from_verl(verl, 0.02, "reinforce_plus_plus").level == "token"
    assert cfg.reward_kl_from_verl(verl, 0.02, "reinforce_plus_plus_baseline").level == "sequence"
    proto = loss_config_to_proto(cfg.build_loss_config(kl=cfg.kl_from_verl(verl, 0.001)))
    assert proto.kl.HasField("value_clamp") == (bound is not None)


def test_slime_and_nemo_rl_kl_settings_are_refused_naming_their_option() -> None:
    """kl_from_slime and kl_from_nemo_rl (their mappings are tested against the peers' KL in
    tests/test_peer_slime.py and tests/test_peer_nemo_rl.py): an unknown type, and a flag that
    is not a bool (a string "False" would have turned it on), are refused by the peer's name;
    the weight reaches the proto."""
    with pytest.raises(ValueError, match=r"kl_loss_type: unknown_choice: 'mse'; one of \['k1'"):
        cfg.kl_from_slime("mse", 0.1)
    with pytest.raises(ValueError, match=r"use_unbiased_kl: bad_type: 'False'"):
        cfg.kl_from_slime("k1", 0.1, "False")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="reference_policy_kl_type: unknown_choice: 'low_var_kl'"):
        cfg.kl_from_nemo_rl("low_var_kl", 0.1)
    with pytest.raises(ValueError, match="use_on_policy_kl_approximation: bad_type: 1"):
        cfg.kl_from_nemo_rl("k3", 0.1, use_on_policy_kl_approximation=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="kl_loss_coef: bad_type"):
        cfg.kl_from_slime("k1", "0.1x")
    with pytest.raises(ValueError, match="reference_policy_kl_penalty: bad_type"):
        cfg.kl_from_nemo_rl("k1", None)  # type: ignore[arg-type]
    assert cfg.kl_from_slime("k1", 0.1) == cfg.KLConfig("k1", 0.1)
    # numpy's bools are bools, as elsewhere in the client; NeMo-RL's penalty 0 is no KL term
    # (it then reads no reference log-probs; a KL term of beta 0 would still need them)
    assert cfg.kl_from_slime("k1", 0.1, np.True_).weight == "ratio"
    assert cfg.kl_from_nemo_rl("k3", 0.1, use_on_policy_kl_approximation=np.bool_(False)).weight == "score"  # type: ignore[union-attr]
    assert cfg.kl_from_nemo_rl("k3", 0.0) is None
    from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

    proto = loss_config_to_proto(cfg.build_loss_config(kl=cfg.kl_from_nemo_rl("k2", 0.1)))
    assert proto.kl.weight == pb.KL_WEIGHT_SCORE and proto.kl.value_clamp == 10.0


def test_an_unknown_verl_kl_type_is_refused_naming_verls_option() -> None:
    """An unknown type, and an advantage estimator without a counterpart here (remax's and
    gae's returns are per token, not the outcome estimators' sum; a typo or None went as
    level sequence: a review), are refused naming verl's option."""
    with pytest.raises(ValueError, match=r"kl_loss_type: unknown_choice: 'full'; one of \['kl'"):
        cfg.kl_from_verl("full", 0.1)
    with pytest.raises(ValueError, match="kl_penalty: unknown_choice: 'k4'"):
        cfg.reward_kl_from_verl("k4", 0.1, "grpo")
    for est in ("remax", "gae", "grpoo", None):
        with pytest.raises(ValueError, match="adv_estimator: unknown_choice"):
            cfg.reward_kl_from_verl("k3", 0.1, est)  # type: ignore[arg-type]
    assert cfg.reward_kl_from_verl("k1", 0.1, "rloo_vectorized").level == "sequence"


def test_build_loss_config_flat_keywords() -> None:
    c = cfg.build_loss_config(
        tau_pos=2.0, objective="sapo", aggregation="token_mean", num_tokens=100, kl_beta=0.1, outputs="ratio"
    )
    assert c.objective == cfg.Objective("sapo", {"tau_pos": 2.0})
    assert c.aggregation == cfg.AggregationConfig(mode="token_mean", num_tokens=100)
    assert c.kl == cfg.KLConfig(beta=0.1)
    assert c.outputs == ("ratio",)
    assert c.mismatch is None
    c2 = cfg.build_loss_config(c, objective=cfg.grpo(eps_high=0.28), kl=cfg.KLConfig("k1", 0.5))
    assert c2.objective.params == {"eps_high": 0.28}
    assert c2.kl == cfg.KLConfig("k1", 0.5)
    with pytest.raises(ValueError, match=r"config\.objective\.reinforce\.tau_pos: unexpected"):
        cfg.build_loss_config(objective="reinforce", tau_pos=1.0)
    with pytest.raises(TypeError, match="unknown loss option"):
        cfg.build_loss_config(bogus=1)
    # each flat alias fills the field it names
    c3 = cfg.build_loss_config(adv_eps=1e-3, min_group_std=0.1, beta=0.25, mismatch_lo=0.4, mismatch_hi=3.0)
    assert (c3.advantages.eps, c3.advantages.min_group_std) == (1e-3, 0.1)
    assert c3.kl == cfg.KLConfig(beta=0.25)
    assert c3.mismatch == cfg.MismatchConfig(lo=0.4, hi=3.0)
    # batch_normalize: True asks for it (a TIS correction at its defaults); False alone asks for
    # no correction, and leaves a correction given as it was; numpy's bool is a bool, 1 is not
    assert cfg.build_loss_config(mismatch_batch_normalize=True).mismatch == cfg.MismatchConfig(
        batch_normalize=True
    )
    torch = pytest.importorskip("torch")
    for off in (False, np.bool_(False), torch.tensor(False)):
        assert cfg.build_loss_config(mismatch_batch_normalize=off).mismatch is None
    # (only that keyword: another False is not "off" but a bool where a number goes, refused as
    # the server refuses it, in either order; True was sent as 1.0)
    for kw in ({"kl_estimator": "k3", "kl_beta": False}, {"kl_beta": False, "kl_estimator": "k3"}):
        with pytest.raises(ValueError, match=r"config\.kl\.beta: bad_type: expected a number, got False"):
            cfg.build_loss_config(**kw)
    c4 = cfg.build_loss_config(mismatch_cap=3.0, mismatch_batch_normalize=False)
    assert c4.mismatch == cfg.MismatchConfig(cap=3.0)
    # a KL in the reward: its flat keywords fill RewardKLConfig; an estimator or level without
    # beta (the server's 0: none) is refused, as a KL term's is
    c5 = cfg.build_loss_config(reward_kl_beta=0.1, reward_kl_level="sequence")
    assert c5.reward_kl == cfg.RewardKLConfig(beta=0.1, level="sequence") and c5.kl is None
    assert cfg.build_loss_config().reward_kl is None
    with pytest.raises(ValueError, match=r"config\.reward_kl\.beta: missing"):
        cfg.build_loss_config(reward_kl_estimator="k3")
    with pytest.raises(
        ValueError, match=r"config\.kl\.beta: missing"
    ):  # (a review: a weight was let through)
        cfg.build_loss_config(kl_weight="ratio")
    # an unknown estimator is refused listing a reward's choices (test_client: the engine's);
    # the loss term's k3_is and alike pass, for the server to refuse with its reason
    with pytest.raises(
        ValueError, match=r"estimator: unknown_choice: 'k9'; one of \['k1', 'k2', 'k3', 'abs'\]$"
    ):
        loss_config_to_proto(cfg.build_loss_config(reward_kl_beta=0.1, reward_kl_estimator="k9"))
    assert loss_config_to_proto(
        cfg.build_loss_config(reward_kl_beta=0.1, reward_kl_estimator="k3_is")
    ).reward_kl.estimator
    assert cfg.MismatchConfig(batch_normalize=np.bool_(True)).batch_normalize is True
    with pytest.raises(ValueError, match=r"config\.mismatch\.batch_normalize: bad_type"):
        cfg.MismatchConfig(batch_normalize=1)  # type: ignore[arg-type]
    # a flat keyword refines a section given whole, in either order (found by an audit: the
    # order was the call's when an argument was unhashable, and kl_beta was then lost)
    for kw in ({"kl_beta": 0.5, "kl": cfg.KLConfig("k3")}, {"kl": cfg.KLConfig("k3"), "kl_beta": 0.5}):
        for outputs in (("ratio",), ["ratio"]):
            assert _loss_config(None, {**kw, "outputs": outputs}).kl == cfg.KLConfig("k3", 0.5)


def test_another_objective_by_name_starts_from_no_parameters() -> None:
    """objective="grpo" over a sapo base drops sapo's parameters; the base's own name keeps them."""
    base = cfg.LossConfig(objective=cfg.sapo(tau_pos=2.0))
    assert cfg.build_loss_config(base, objective="grpo", eps_high=0.3).objective == cfg.grpo(eps_high=0.3)
    assert cfg.build_loss_config(base, objective="sapo", tau_neg=1.5).objective == cfg.sapo(2.0, 1.5)


def test_the_objective_helpers_keep_each_parameter_in_its_place_zeros_included() -> None:
    """cfg.sapo / cfg.grpo do not swap their parameters, and a 0.0 is a value set, not None."""
    assert cfg.sapo(tau_pos=1.0, tau_neg=2.0).params == {"tau_pos": 1.0, "tau_neg": 2.0}
    assert cfg.grpo(eps_low=0.0, eps_high=0.3, dual_clip=0.0).params == {
        "eps_low": 0.0,
        "eps_high": 0.3,
        "dual_clip": 0.0,
    }
    assert cfg.sapo(tau_neg=0.0).params == {"tau_neg": 0.0}


def test_request_configurations_are_remembered_only_for_equal_arguments() -> None:
    from softgate_client.client import _messages

    a = _loss_config(None, {"objective": "sapo", "tau_pos": 2.0})
    assert _loss_config(None, {"tau_pos": 2.0, "objective": "sapo"}) is a  # remembered
    assert _messages(a) is _messages(a)
    b = _loss_config(None, {"objective": "sapo", "tau_pos": 3.0})
    assert b.objective.params == {"tau_pos": 3.0} and _messages(b)[0] == loss_config_to_proto(b)
    # a base configuration is part of the key; unhashable values are built every time
    base = cfg.LossConfig(objective=cfg.grpo(eps_high=0.28))
    assert _loss_config(base, {"kl_beta": 0.1}).objective.params == {"eps_high": 0.28}
    assert _loss_config(None, {"outputs": ["ratio", "mask"]}).outputs == ("ratio", "mask")
    assert _messages(_loss_config(None, {"outputs": ["ratio"]}))[1].ratio
    with pytest.raises(TypeError, match="unknown loss option"):
        _loss_config(None, {"bogus": 1})


def test_each_configuration_field_lands_in_its_own_proto_field() -> None:
    """eps / min_group_std and log_ratio_clamp / saturation_threshold are not swapped, and an
    advantages section with only min_group_std set is sent."""
    c = cfg.LossConfig(
        advantages=cfg.AdvantageConfig(eps=1e-3, min_group_std=0.25),
        log_ratio_clamp=15.0,
        saturation_threshold=0.75,
    )
    m = loss_config_to_proto(c)
    assert (m.advantages.eps, m.advantages.min_group_std) == (1e-3, 0.25)
    assert (m.log_ratio_clamp, m.saturation_threshold) == (15.0, 0.75)
    only = loss_config_to_proto(cfg.LossConfig(advantages=cfg.AdvantageConfig(min_group_std=0.25)))
    assert only.HasField("advantages") and only.advantages.HasField("min_group_std")
    assert only.advantages.min_group_std == 0.25 and not only.advantages.HasField("eps")
    # gamma 0 (the outcome at the last token alone) is sent, not read as unset (1)
    zero = loss_config_to_proto(cfg.build_loss_config(estimator="reinforce_pp", gamma=0))
    assert zero.advantages.HasField("gamma") and zero.advantages.gamma == 0.0
    assert not loss_config_to_proto(cfg.LossConfig()).advantages.HasField("gamma")


def test_wire_encoding_parses_like_the_generated_classes() -> None:
    from softgate_client import _wire
    from softgate_client.client import output_selection
    from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

    rng = np.random.default_rng(0)
    logp = -rng.random((5, 7)).astype(np.float64)
    mask = np.ones((5, 7), bool)
    mask[1, 3:] = False
    mask[2, 1] = False
    p = pack_batch(logp, logp - 0.1, mask=mask, rewards=rng.random(5), group_ids=[3, 3, -1, -1, 2 << 40])
    c = cfg.build_loss_config(objective="grpo", eps_high=0.28, kl_beta=0.1, outputs=("ratio",))
    raw = _wire.message({1: loss_config_to_proto(c), 3: output_selection(c.outputs)}, {2: p.pieces()}).join()
    want = pb.ComputeLossRequest(config=loss_config_to_proto(c), outputs=output_selection(c.outputs))
    p.fill(want.batch)
    assert pb.ComputeLossRequest.FromString(raw) == want
    # a chunk: offsets rebased, slices of the arrays
    chunk = pb.Batch.FromString(p.pieces(2, 4).join())
    assert chunk == p.batch(2, 4)
    assert np.frombuffer(chunk.offsets.data, "<i8")[0] == 0

    resp = pb.ComputeLossResponse(loss=1.5, policy_loss=1.0, kl_loss=0.5, metrics={"a": 1.0, "b": -2.0})
    resp.outputs.gradient.dtype = pb.DTYPE_FLOAT64
    resp.outputs.gradient.shape.append(4)
    resp.outputs.gradient.data = np.arange(4, dtype="<f8").tobytes()
    resp.outputs.clip_mask.dtype = pb.DTYPE_BOOL
    resp.outputs.clip_mask.data = bytes([0, 1, 1, 0])
    small, outs = _wire.split_response(resp.SerializeToString(), 5, pb.ComputeLossResponse)
    assert (small.loss, small.policy_loss, small.kl_loss, dict(small.metrics)) == (
        1.5,
        1.0,
        0.5,
        {"a": 1.0, "b": -2.0},
    )
    assert outs["gradient"].tolist() == [0, 1, 2, 3] and outs["clip_mask"].tolist() == [
        False,
        True,
        True,
        False,
    ]
    assert _wire.varint(300) == b"\xac\x02" and _wire.varint(-1) == b"\xff" * 9 + b"\x01"


def test_a_client_mask_of_a_value_other_than_0_and_1_is_refused_as_the_engine_refuses_it():
    """make_layout took mask 'nonzero = trained': a soft weight of 0.5 trained at full weight, a
    silently wrong gradient, where the engine refuses it (`bad_mask`; an audit)."""
    logp = -np.ones((1, 4), dtype=np.float32)
    for mask, value in ((np.array([[2, 0, 1, 0]]), "2"), (np.array([[1.0, 0.0, 0.5, 0.0]]), "0.5")):
        with pytest.raises(ArrayInputError) as e:
            make_layout(logp, mask=mask)
        assert e.value.field == "mask" and str(e.value).startswith(f"mask: bad_mask: {value}; ")
    for mask in (
        np.array([[1, 0, 1, 0]], np.int8),
        np.array([[1.0, 0.0, 1.0, 0.0]]),
        np.array([[True, False, True, False]]),
    ):
        lay = make_layout(logp, mask=mask)
        assert lay.offsets.tolist() == [0, 3]  # up to the last trained token
        assert lay.mask is not None and lay.mask.tolist() == [True, False, True]


def test_off_policy_mask_reference_goes_unset_at_its_default() -> None:
    """The reference "rollout" (the default) is sent as the unset 0, which a server from before the field
    reads as its only behaviour; "old" as OLD; an unknown name is refused, naming the field."""
    assert (
        loss_config_to_proto(
            cfg.build_loss_config(off_policy_mask_reference="rollout")
        ).off_policy_mask_reference
        == 0
    )
    from softgate_client.proto.softgate.v1 import softgate_pb2 as pb

    old = loss_config_to_proto(
        cfg.build_loss_config(off_policy_mask_threshold=0.1, off_policy_mask_reference="old")
    )
    assert old.off_policy_mask_reference == pb.OFF_POLICY_MASK_REFERENCE_OLD
    with pytest.raises(ValueError, match=r"config\.off_policy_mask_reference: unknown_choice: 'sampler'"):
        loss_config_to_proto(cfg.build_loss_config(off_policy_mask_reference="sampler"))


def test_a_list_of_tensors_that_require_grad_is_refused_by_name() -> None:
    """An audit: numpy's RuntimeError ("Can't call numpy() on Tensor that requires grad")
    escaped, naming no field; one tensor that requires grad is read as it is."""
    torch = pytest.importorskip("torch")
    rows = [torch.full((3,), -1.0, requires_grad=True)] * 2
    with pytest.raises(ArrayInputError, match=r"bad_type: a sequence numpy cannot read") as e:
        to_numpy(rows, "batch.logp")
    assert e.value.field == "batch.logp"
