"""Trainer mistakes the engine refuses (an audit of a realistic trainer), so that in-process
and served callers alike are told."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from softgate.engine import AggregationConfig, Batch, Engine, InputError, KLConfig, LossConfig, MismatchConfig
from softgate.engine.errors import FieldViolation
from softgate.engine.validation import REASON_CODES, validate_config
from softgate_client import InvalidArgumentError, SoftgateClient

E = Engine(device="cpu", compile=False)

REFUSED = [
    (
        "seq_mean_token_mean",
        {"num_tokens": 94.0},
        "aggregation.num_seqs",
        "missing: seq_mean_token_mean normalises by num_seqs; num_tokens is not used by this mode",
    ),
    (
        "seq_mean_token_sum",
        {"num_tokens": 94.0},
        "aggregation.num_seqs",
        "missing: seq_mean_token_sum normalises by num_seqs; num_tokens is not used by this mode",
    ),
    (
        "token_mean",
        {"num_seqs": 19.0},
        "aggregation.num_tokens",
        "missing: token_mean normalises by num_tokens; num_seqs is not used by this mode",
    ),
    (
        "token_mean",
        {"num_tokens": 94.0, "constant": 160.0},
        "aggregation.constant",
        "unsupported: only token_sum_norm reads constant; token_mean normalises by num_tokens",
    ),
    (
        "seq_mean_token_mean",
        {"num_seqs": 19.0, "constant": 160.0},
        "aggregation.constant",
        "unsupported: only token_sum_norm reads constant; seq_mean_token_mean normalises by num_seqs",
    ),
    (  # a review: token_sum_norm dropped a lone num_tokens / num_seqs without a word
        "token_sum_norm",
        {"constant": 160.0, "num_tokens": 94.0},
        "aggregation.num_tokens",
        "unsupported: token_sum_norm normalises by constant; num_tokens is not used by this mode",
    ),
    (
        "token_sum_norm",
        {"constant": 160.0, "num_seqs": 19.0},
        "aggregation.num_seqs",
        "unsupported: token_sum_norm normalises by constant; num_seqs is not used by this mode",
    ),
]


@pytest.mark.parametrize("mode, given, field, reason", REFUSED)
def test_a_normaliser_the_mode_does_not_read_is_refused(mode, given, field, reason) -> None:
    """It was accepted and ignored: a micro-batching trainer passing `num_tokens` beside the
    default seq_mean_token_mean got each micro-batch normalised by its own N_seq, a gradient
    about n_micro times the whole batch's."""
    cfg = LossConfig(aggregation=AggregationConfig(mode=mode, **given))
    assert validate_config(cfg) == [FieldViolation(field, reason)]
    assert reason.split(":")[0] in REASON_CODES
    lp = torch.tensor([-0.5, -0.6, -0.7], dtype=torch.float64)
    b = Batch(
        logp=lp, offsets=torch.tensor([0, 1, 3]), advantages=torch.tensor([1.0, -1.0], dtype=torch.float64)
    )
    with pytest.raises(InputError) as ei:
        E.loss(b, cfg)
    assert [(v.field, v.reason) for v in ei.value.violations] == [(field, reason)]


@pytest.mark.parametrize(
    "mode, given",
    [
        ("seq_mean_token_mean", {}),
        ("seq_mean_token_mean", {"num_seqs": 19.0}),
        ("seq_mean_token_mean", {"num_tokens": 94.0, "num_seqs": 19.0}),  # both: common, harmless
        ("seq_mean_token_sum", {"num_seqs": 19.0}),
        ("token_mean", {"num_tokens": 94.0}),
        ("token_mean", {"num_tokens": 94.0, "num_seqs": 19.0}),
        ("token_sum_norm", {"constant": 160.0}),
        ("token_sum_norm", {"constant": 160.0, "num_tokens": 94.0, "num_seqs": 19.0}),
    ],
)
def test_the_modes_own_normaliser_or_both_are_accepted(mode, given) -> None:
    assert validate_config(LossConfig(aggregation=AggregationConfig(mode=mode, **given))) == []


def test_a_served_caller_gets_the_engines_refusal(inprocess_server) -> None:
    """Through gRPC, with the default aggregation: the trainer's `num_tokens=` alone."""
    with SoftgateClient(inprocess_server().target, retries=1, timeout=30) as client:
        lp = -np.ones((2, 3))
        with pytest.raises(InvalidArgumentError) as ei:
            client.loss(lp, advantages=[1.0, -1.0], num_tokens=6)
        assert [(v.field, v.description) for v in ei.value.violations] == [
            (
                "config.aggregation.num_seqs",
                "missing: seq_mean_token_mean normalises by num_seqs; num_tokens is not used by this mode",
            )
        ]
        assert client.loss(lp, advantages=[1.0, -1.0], num_tokens=6, num_seqs=2).loss == pytest.approx(
            client.loss(lp, advantages=[1.0, -1.0]).loss
        )


@pytest.mark.parametrize("name", ["logp", "old_logp", "ref_logp", "rollout_logp"])
def test_half_precision_log_probs_are_sent_for_from_float32_logits(name) -> None:
    """The refusal advised `.float()`, which keeps the bf16 rounding (on-policy GSPO then
    clipped every token): the advice is float32 logits, or the sampler's float32 logprobs."""
    lp = torch.tensor([-0.5, -0.6, -0.7], dtype=torch.float32)
    kw = {"logp": lp, "old_logp": lp, "ref_logp": lp, "rollout_logp": lp, name: lp.to(torch.bfloat16)}
    b = Batch(offsets=torch.tensor([0, 1, 3]), advantages=torch.tensor([1.0, -1.0]), **kw)
    cfg = LossConfig(kl=KLConfig(beta=0.1), mismatch=MismatchConfig())
    with pytest.raises(InputError) as ei:
        E.loss(b, cfg)
    (why,) = [v.reason for v in ei.value.violations if v.field == name]
    assert why.startswith(f"half_precision: {name} is bfloat16; send {name} as float32 or float64"), why
    assert "`logits.float().log_softmax(-1)`" in why
    assert "`.float()` on bfloat16 log-probs keeps their rounding" in why
    assert ("ask the sampler for float32 logprobs" in why) == (name in ("old_logp", "rollout_logp"))
