"""SoftgateClient against a real softgate server on loopback: values equal the in-process
engine bit for bit, unary and streamed; padded == ragged; torch adapter; errors; retries; TLS."""

from __future__ import annotations

import dataclasses
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
import torch
from softgate.engine import Batch, Engine, LossConfig
from softgate.engine import config as ec
from softgate.telemetry import Telemetry
from softgate_client import (
    AdvantageConfig,
    InvalidArgumentError,
    KLConfig,
    MismatchConfig,
    RejectionCriterion,
    RetryPolicy,
    SoftgateClient,
    UnavailableError,
    pack_batch,
)
from softgate_client import config as cfg
from softgate_client.client import LossResult
from softgate_client.torch import softgate_loss
from test_client_harness import ServerThread, engine, free_port

ALL_OUTPUTS = ("advantages", "ratio", "gate_weight", "clip_mask", "mask")


@pytest.fixture(scope="module")
def server():
    with ServerThread() as s:
        yield s


@pytest.fixture()
def client(server):
    with SoftgateClient(f"127.0.0.1:{server.port}", run="client-tests", timeout=60) as c:
        yield c


def padded_batch(seed: int = 0, b: int = 12, t: int = 40, dtype=np.float32) -> dict[str, np.ndarray]:
    """A padded batch: right padding, some interior masked tokens, one empty row, 3 groups."""
    rng = np.random.default_rng(seed)
    logp = (-rng.random((b, t)) * 3 - 0.05).astype(dtype)
    old = np.minimum(logp + rng.standard_normal((b, t)) * 0.2, -1e-3).astype(dtype)
    ref = np.minimum(logp + rng.standard_normal((b, t)) * 0.1, -1e-3).astype(dtype)
    rollout = np.minimum(old + rng.standard_normal((b, t)) * 0.05, -1e-3).astype(dtype)
    lengths = rng.integers(1, t + 1, b)
    lengths[3] = 0
    mask = np.arange(t)[None, :] < lengths[:, None]
    mask[0, 2] = False  # a tool-output token inside a sequence
    mask[5, 0] = False
    logp[~mask] = 7.0  # garbage in masked / padded positions must never matter
    rewards = rng.integers(0, 2, b).astype(np.float32)
    group_ids = np.repeat(np.arange(b // 4), 4)[rng.permutation(b)]
    return {
        "logp": logp,
        "old_logp": old,
        "ref_logp": ref,
        "rollout_logp": rollout,
        "mask": mask,
        "rewards": rewards,
        "group_ids": group_ids,
    }


def ragged_of(p: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """The ragged equivalent the client sends for a padded batch (rows up to their last mask=1)."""
    mask = p["mask"]
    t = mask.shape[1]
    last = np.where(mask.any(1), t - np.argmax(mask[:, ::-1], axis=1), 0)
    valid = np.arange(t)[None, :] < last[:, None]
    out = {k: p[k][valid] for k in ("logp", "old_logp", "ref_logp", "rollout_logp", "mask")}
    out["offsets"] = np.concatenate([[0], np.cumsum(last)]).astype(np.int64)
    out["rewards"], out["group_ids"] = p["rewards"], p["group_ids"]
    return out, valid


def engine_batch(r: dict[str, np.ndarray]) -> Batch:
    t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in r.items()}
    return Batch(
        logp=t["logp"],
        offsets=t["offsets"],
        old_logp=t["old_logp"],
        mask=t["mask"],
        ref_logp=t["ref_logp"],
        rollout_logp=t["rollout_logp"],
        rewards=t["rewards"],
        group_ids=t["group_ids"].to(torch.int64),
    )


CASES = [
    # (client keywords, engine LossConfig)
    ({"objective": "sapo"}, LossConfig()),
    (  # verl's SAPO with a KL loss: the policy term per sequence, the KL term per token
        {"objective": "sapo", "kl_beta": 0.05, "kl_aggregation": "token_mean"},
        LossConfig(kl=ec.KLConfig("k3", 0.05, aggregation="token_mean")),
    ),
    (  # verl's low_var_kl loss, its value bounded (10 there; 0.01 here, so that tokens pass it)
        {"objective": "grpo", "kl_beta": 0.05, "kl_estimator": "k3", "kl_value_clamp": 0.01},
        LossConfig(objective=ec.Grpo(), kl=ec.KLConfig("k3", 0.05, value_clamp=0.01)),
    ),
    (  # slime's --use-unbiased-kl with its default k1: the KL weighted by the ratio to old
        {"objective": "grpo", "kl_beta": 0.05, "kl_estimator": "k1", "kl_weight": "ratio"},
        LossConfig(objective=ec.Grpo(), kl=ec.KLConfig("k1", 0.05, weight="ratio")),
    ),
    (  # NeMo-RL's use_on_policy_kl_approximation: the ratio to the sampler, w k clamped at 10
        {"kl_beta": 0.05, "kl_weight": "sampler_ratio", "kl_value_clamp": 10.0},
        LossConfig(kl=ec.KLConfig("k3", 0.05, value_clamp=10.0, weight="sampler_ratio")),
    ),
    (  # NeMo-RL's KL, whose weight exp(logp - sg[logp]) adds k to the gradient
        {"kl_beta": 0.05, "kl_estimator": "k2", "kl_weight": "score"},
        LossConfig(kl=ec.KLConfig("k2", 0.05, weight="score")),
    ),
    (  # verl's rollout_is_batch_normalize on sequence-level TIS weights
        {"objective": "grpo", "mismatch_level": "sequence", "mismatch_batch_normalize": True},
        LossConfig(objective=ec.Grpo(), mismatch=ec.MismatchConfig(level="sequence", batch_normalize=True)),
    ),
    (  # AReaL's sequence-level ratio rejection (action clamp): the geometric-mean weight clamped
        {"objective": "grpo", "mismatch_level": "geometric", "mismatch_floor": 0.8, "mismatch_cap": 1.25},
        LossConfig(objective=ec.Grpo(), mismatch=ec.MismatchConfig(level="geometric", floor=0.8, cap=1.25)),
    ),
    (  # OpenRLHF's REINFORCE++: a k1 KL in each token's reward, the return whitened over tokens
        {"objective": "grpo", "estimator": "reinforce_pp", "reward_kl_beta": 0.05},
        LossConfig(
            objective=ec.Grpo(),
            advantages=ec.AdvantageConfig("reinforce_pp"),
            reward_kl=ec.RewardKLConfig(beta=0.05),
        ),
    ),
    (  # REINFORCE++ with OpenRLHF's --gamma: each token's return discounted to its sequence's end
        {"objective": "grpo", "estimator": "reinforce_pp", "gamma": 0.9, "reward_kl_beta": 0.05},
        LossConfig(
            objective=ec.Grpo(),
            advantages=ec.AdvantageConfig("reinforce_pp", gamma=0.9),
            reward_kl=ec.RewardKLConfig(beta=0.05),
        ),
    ),
    (  # verl's grpo with use_kl_in_reward (low_var_kl): the KL summed into each reward
        {
            "objective": "grpo",
            "reward_kl_beta": 0.1,
            "reward_kl_estimator": "k3",
            "reward_kl_level": "sequence",
        },
        LossConfig(
            objective=ec.Grpo(), reward_kl=ec.RewardKLConfig(beta=0.1, estimator="k3", level="sequence")
        ),
    ),
    (  # ... with verl's bound on each token's k
        {
            "objective": "grpo",
            "reward_kl_beta": 0.1,
            "reward_kl_estimator": "k3",
            "reward_kl_level": "sequence",
            "reward_kl_value_clamp": 0.01,
        },
        LossConfig(
            objective=ec.Grpo(),
            reward_kl=ec.RewardKLConfig(beta=0.1, estimator="k3", level="sequence", value_clamp=0.01),
        ),
    ),
    (  # a TIS window [floor, cap] that binds on both sides (weights exp(+-0.05) here)
        {"objective": "grpo", "mismatch_cap": 1.02, "mismatch_floor": 0.98},
        LossConfig(objective=ec.Grpo(), mismatch=ec.MismatchConfig(cap=1.02, floor=0.98)),
    ),
    (
        {
            "objective": "sapo",
            "tau_pos": 0.7,
            "tau_neg": 1.3,
            "aggregation": "token_mean",
            "num_tokens": 1000,
        },
        LossConfig(
            objective=ec.Sapo(tau_pos=0.7, tau_neg=1.3),
            aggregation=ec.AggregationConfig(mode="token_mean", num_tokens=1000),
        ),
    ),
    (
        {"objective": "grpo", "eps_high": 0.28, "dual_clip": 3.0, "estimator": "rloo"},
        LossConfig(objective=ec.Grpo(eps_high=0.28, dual_clip=3.0), advantages=ec.AdvantageConfig("rloo")),
    ),
    (
        {
            "objective": "gspo",
            "dual_clip": 1.5,
            "kl": KLConfig("k3", 0.05),
            "mismatch": MismatchConfig(level="sequence", mode="mask", lo=0.2, hi=5.0),
        },
        LossConfig(
            objective=ec.Gspo(dual_clip=1.5),
            kl=ec.KLConfig("k3", 0.05),
            mismatch=ec.MismatchConfig(level="sequence", mode="mask", lo=0.2, hi=5.0),
        ),
    ),
    (
        {
            "objective": "dro",
            "coef": 0.2,
            "aggregation": "token_sum_norm",
            "constant": 1.0,
            "off_policy_mask_threshold": 0.5,
            "off_policy_mask_reference": "old",
        },
        LossConfig(
            objective=ec.Dro(coef=0.2),
            aggregation=ec.AggregationConfig(mode="token_sum_norm", constant=1.0),
            off_policy_mask_threshold=0.5,
            off_policy_mask_reference="old",
        ),
    ),
    (
        {
            "objective": "cispo",
            "advantage_config": AdvantageConfig("dr_grpo", "batch"),
            "aggregation": "seq_mean_token_sum",
        },
        LossConfig(
            objective=ec.Cispo(),
            advantages=ec.AdvantageConfig("dr_grpo", "batch"),
            aggregation=ec.AggregationConfig(mode="seq_mean_token_sum"),
        ),
    ),
    (
        {
            "objective": "gppo",
            "aggregation": "token_sum_norm",
            "constant": 512.0,
            "kl_beta": 0.1,
            "kl_estimator": "k2",
        },
        LossConfig(
            objective=ec.Gppo(),
            aggregation=ec.AggregationConfig(mode="token_sum_norm", constant=512.0),
            kl=ec.KLConfig("k2", 0.1),
        ),
    ),
    (
        {"objective": "gmpo", "eps_low": 0.3, "eps_high": 0.5, "aggregation": "token_mean"},
        LossConfig(
            objective=ec.Gmpo(eps_low=0.3, eps_high=0.5),
            aggregation=ec.AggregationConfig(mode="token_mean"),
        ),
    ),
    (
        {"objective": "dppo_kl", "eps_high": 0.1, "ratio_cap": 3.0, "aggregation": "token_mean"},
        LossConfig(
            objective=ec.DppoKl(eps_high=0.1, ratio_cap=3.0),
            aggregation=ec.AggregationConfig(mode="token_mean"),
        ),
    ),
    (
        {"objective": "clip_cov", "fraction": 0.01, "cov_high": 3.0, "seed": 2**64 - 1},
        LossConfig(objective=ec.ClipCov(fraction=0.01, cov_high=3.0, seed=2**64 - 1)),
    ),
    (
        {"objective": "kl_cov", "fraction": 0.5, "coef": 0.1, "aggregation": "token_mean"},
        LossConfig(
            objective=ec.KlCov(fraction=0.5, coef=0.1), aggregation=ec.AggregationConfig(mode="token_mean")
        ),
    ),
    (
        {"objective": "reinforce", "estimator": "reinforce_pp_baseline"},
        LossConfig(objective=ec.Reinforce(), advantages=ec.AdvantageConfig("reinforce_pp_baseline")),
    ),
    (  # verl's rollout_rs keywords: tokens past a k1 window, sequences past a mean k3
        {
            "objective": "grpo",
            "rollout_rs": "token_k1,seq_mean_k3",
            "rollout_rs_threshold": "0.95_1.05,0.00125",
        },
        LossConfig(
            objective=ec.Grpo(),
            rejection=(
                ec.RejectionCriterion(1.05, "k1", "token", 0.95),
                ec.RejectionCriterion(0.00125, "k3", "seq_mean"),
            ),
        ),
    ),
    (  # the same as criteria; a max over the sequence
        {"rejection": [RejectionCriterion(0.005, "k2", "seq_max"), RejectionCriterion(1.06, lower=0.9)]},
        LossConfig(
            rejection=(ec.RejectionCriterion(0.005, "k2", "seq_max"), ec.RejectionCriterion(1.06, lower=0.9))
        ),
    ),
    (
        {"estimator": "reinforce_pp", "mismatch_mode": "seq_mask", "mismatch_lo": 0.95, "mismatch_hi": 1.05},
        LossConfig(
            advantages=ec.AdvantageConfig("reinforce_pp"),
            mismatch=ec.MismatchConfig(mode="seq_mask", lo=0.95, hi=1.05),
        ),
    ),
]


def assert_same_as_engine(res, ref, valid=None) -> None:
    def sent(x):
        return x if valid is None else x[valid]

    assert res.loss == ref.loss
    assert res.policy_loss == ref.policy_loss
    assert res.kl_loss == ref.kl_loss
    np.testing.assert_array_equal(sent(res.grad), ref.grad.cpu().numpy())
    for name in ALL_OUTPUTS:
        got = getattr(res, name)
        if got is not None:
            np.testing.assert_array_equal(sent(got), getattr(ref, name).cpu().numpy(), err_msg=name)
    for k, v in ref.metrics.items():
        assert res.metrics[k] == pytest.approx(float(v), nan_ok=True, rel=0, abs=0), k


@pytest.mark.parametrize("case", range(len(CASES)))
def test_unary_and_streamed_equal_engine_bit_for_bit(client, case) -> None:
    kw, ref_cfg = CASES[case]
    p = padded_batch(seed=case)
    r, valid = ragged_of(p)
    ref = engine().loss(engine_batch(r), ref_cfg)
    args = {k: p[k] for k in ("old_logp", "mask", "rewards", "group_ids", "ref_logp", "rollout_logp")}
    unary = client.loss(p["logp"], **args, outputs=ALL_OUTPUTS, stream=False, **kw)
    assert not unary.streamed and unary.grad.shape == p["logp"].shape
    assert_same_as_engine(unary, ref, valid)
    # padding positions come back as zeros
    assert (unary.grad[~valid] == 0).all()

    client.stream_chunk_bytes = 700  # a few sequences per chunk; groups span chunks
    try:
        streamed = client.loss(p["logp"], **args, outputs=ALL_OUTPUTS, stream=True, **kw)
    finally:
        client.stream_chunk_bytes = 4 << 20
    assert streamed.streamed and streamed.chunks > 2
    assert_same_as_engine(streamed, ref, valid)

    ragged = client.loss(
        r["logp"],
        **{k: r[k] for k in ("old_logp", "mask", "rewards", "group_ids", "ref_logp", "rollout_logp")},
        offsets=r["offsets"],
        outputs=ALL_OUTPUTS,
        **kw,
    )
    assert ragged.grad.shape == r["logp"].shape
    assert_same_as_engine(ragged, ref)


def test_a_batch_without_mask_equals_the_engine_unary_and_streamed(client) -> None:
    # no mask: the engine trains every token without a mask tensor (its result's mask is a
    # broadcast True), which the server sends back whole and sliced per chunk
    r, _ = ragged_of(padded_batch(seed=5))
    r = {k: (-np.abs(v) if k.endswith("logp") else v) for k, v in r.items() if k != "mask"}
    batch = engine_batch({**r, "mask": np.ones(len(r["logp"]), bool)})
    # (what is sent: no reference or sampler log-probs)
    ref = engine().loss(dataclasses.replace(batch, mask=None, ref_logp=None, rollout_logp=None), LossConfig())
    assert ref.mask.all() and ref.mask.numel() == len(r["logp"])
    args = {k: r[k] for k in ("old_logp", "rewards", "group_ids", "offsets")}
    for stream in (False, True):
        client.stream_chunk_bytes = 700 if stream else 4 << 20
        try:
            res = client.loss(r["logp"], **args, outputs=ALL_OUTPUTS, stream=stream)
        finally:
            client.stream_chunk_bytes = 4 << 20
        assert res.streamed == stream
        assert_same_as_engine(res, ref)


def test_a_batch_over_a_mebibyte_equals_the_engine_unary_and_streamed(client) -> None:
    """A request of a few MiB takes the server's zero-copy path (codec.VIEW_MIN_BYTES) and
    comes back hand-encoded; streamed, its chunks are over a MiB too."""
    from softgate.grpc.codec import VIEW_MIN_BYTES

    rng = np.random.default_rng(7)
    lengths = rng.integers(0, 2000, 400)
    n = int(lengths.sum())
    logp = (-rng.random(n) * 3 - 0.01).astype(np.float32)
    old = np.minimum(logp + rng.standard_normal(n).astype(np.float32) * 0.1, -1e-4).astype(np.float32)
    ref_logp = np.minimum(logp + rng.standard_normal(n).astype(np.float32) * 0.1, -1e-4).astype(np.float32)
    mask = rng.random(n) < 0.9
    rewards = rng.random(400).astype(np.float32)
    group_ids = np.repeat(np.arange(100), 4)
    assert 3 * 4 * n > 2 * VIEW_MIN_BYTES
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    kw = {"objective": "sapo", "kl_beta": 0.01}
    ref = engine().loss(
        Batch(
            logp=torch.from_numpy(logp),
            offsets=torch.from_numpy(offsets),
            old_logp=torch.from_numpy(old),
            ref_logp=torch.from_numpy(ref_logp),
            mask=torch.from_numpy(mask),
            rewards=torch.from_numpy(rewards),
            group_ids=torch.from_numpy(group_ids),
        ),
        LossConfig(kl=ec.KLConfig(beta=0.01)),
    )
    args = {"old_logp": old, "ref_logp": ref_logp, "mask": mask, "rewards": rewards, "group_ids": group_ids}
    for stream in (False, True):
        client.stream_chunk_bytes = 2 * VIEW_MIN_BYTES if stream else 64 << 20
        try:
            res = client.loss(logp, offsets=offsets, **args, outputs=ALL_OUTPUTS, stream=stream, **kw)
        finally:
            client.stream_chunk_bytes = 4 << 20
        assert res.streamed == stream and (not stream or res.chunks >= 2)
        assert_same_as_engine(res, ref)


def test_a_cuda_server_answers_small_calls_from_the_host(inprocess_server, monkeypatch) -> None:
    """A server whose engine is on CUDA computes calls up to host_max_tokens on the host: they
    come back as a CPU engine computes them, to the bit, unary and streamed, and a large
    gradient-only call is written straight into its response as on a CPU server. No GPU is
    touched (this runs anywhere)."""
    from softgate.grpc import servicer
    from softgate.grpc.response_buffer import _MIN_TOKENS

    real, written = servicer.gradient_response, []

    def spy(*args):
        out = real(*args)
        written.append(out is not None)
        return out

    monkeypatch.setattr(servicer, "gradient_response", spy)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # (Engine refuses a CUDA it lacks)
    srv = inprocess_server(engine=Engine(device="cuda", compile=False, host_max_tokens=_MIN_TOKENS))
    cpu = Engine(device="cpu", compile=False)
    with SoftgateClient(srv.target, stream_chunk_bytes=700) as c:
        for case in range(len(CASES)):
            kw, ref_cfg = CASES[case]
            p = padded_batch(seed=case)
            r, valid = ragged_of(p)
            ref = cpu.loss(engine_batch(r), ref_cfg)
            args = {k: p[k] for k in ("old_logp", "mask", "rewards", "group_ids", "ref_logp", "rollout_logp")}
            for stream in (False, True):
                assert_same_as_engine(
                    c.loss(p["logp"], **args, outputs=ALL_OUTPUTS, stream=stream, **kw), ref, valid
                )
        rng = np.random.default_rng(3)
        n = _MIN_TOKENS
        logp = (-rng.random(n) - 0.01).astype(np.float32)
        old = np.minimum(logp + 0.05 * rng.standard_normal(n), -1e-4).astype(np.float32)
        adv = rng.standard_normal(n).astype(np.float32)
        offsets = np.arange(0, n + 1, 1024)
        ref = cpu.loss(
            Batch(
                logp=torch.from_numpy(logp),
                offsets=torch.from_numpy(offsets),
                old_logp=torch.from_numpy(old),
                advantages=torch.from_numpy(adv),
            ),
            LossConfig(),
        )
        written.clear()
        res = c.loss(logp, offsets=offsets, old_logp=old, advantages=adv, stream=False)
        assert written == [True]  # the engine wrote the gradient into the response's bytes
        np.testing.assert_array_equal(res.grad, ref.grad.numpy())
        assert res.loss == ref.loss


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_server_equals_cuda_engine_bit_for_bit(inprocess_server, monkeypatch, compile) -> None:
    """A server whose engine runs on CUDA sends back what that engine computes in-process,
    unary and streamed (compiled: the default SAPO configuration only, each one compiles;
    eager: every copy through pinned memory, which only large batches take otherwise)."""
    from softgate.engine import transfer

    if not compile:
        monkeypatch.setattr(transfer, "PIN_MIN_BYTES", 0)
    eng = Engine(device="cuda", compile=compile, host_max_tokens=0)  # every batch on the GPU
    srv = inprocess_server(engine=eng, device="cuda")
    with SoftgateClient(srv.target, timeout=600, stream_chunk_bytes=700) as c:
        for case in [0] if compile else range(len(CASES)):
            kw, ref_cfg = CASES[case]
            p = padded_batch(seed=case)
            r, valid = ragged_of(p)
            ref = eng.loss(engine_batch(r), ref_cfg)
            assert ref.grad.device.type == "cuda"
            args = {k: p[k] for k in ("old_logp", "mask", "rewards", "group_ids", "ref_logp", "rollout_logp")}
            for stream in (False, True):
                res = c.loss(p["logp"], **args, outputs=ALL_OUTPUTS, stream=stream, **kw)
                assert res.streamed == stream
                assert_same_as_engine(res, ref, valid)


def test_automatic_streaming_above_threshold(server) -> None:
    p = padded_batch(seed=11, b=16, t=64)
    args = {k: p[k] for k in ("old_logp", "mask", "rewards", "group_ids")}
    with SoftgateClient(
        f"127.0.0.1:{server.port}", stream_threshold_bytes=2000, stream_chunk_bytes=1000
    ) as c:
        auto = c.loss(p["logp"], **args)
        forced_unary = c.loss(p["logp"], **args, stream=False)
    assert auto.streamed and auto.chunks > 1 and not forced_unary.streamed
    assert auto.loss == forced_unary.loss
    np.testing.assert_array_equal(auto.grad, forced_unary.grad)


def test_one_client_shared_by_threads_gives_each_call_its_own_result(server) -> None:
    """A trainer overlaps calls with its own work from a thread pool on one client: unary and
    streamed calls in flight together each get exactly the result of the same call made alone."""
    batches = [padded_batch(seed=20 + i, b=8 + 4 * (i % 3), t=24 + 8 * i) for i in range(8)]
    keys = ("old_logp", "mask", "rewards", "group_ids")
    with SoftgateClient(
        f"127.0.0.1:{server.port}", stream_threshold_bytes=3000, stream_chunk_bytes=1500, timeout=60
    ) as c:
        alone = [c.loss(p["logp"], **{k: p[k] for k in keys}, objective="sapo") for p in batches]
        start = threading.Barrier(4)

        def call(p: dict[str, np.ndarray], barrier: threading.Barrier | None = None):
            if barrier is not None:  # four calls leave together
                barrier.wait(timeout=30)
            return c.loss(p["logp"], **{k: p[k] for k in keys}, objective="sapo")

        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda p: call(p, start), batches[:4]))
            together += list(pool.map(call, batches[4:]))
    assert {r.streamed for r in alone} == {True, False}
    for a, t in zip(alone, together, strict=True):
        assert (t.loss, t.streamed, t.metrics) == (a.loss, a.streamed, a.metrics)
        np.testing.assert_array_equal(t.grad, a.grad)


@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (0, 0)])
def test_an_empty_padded_batch_gives_loss_zero(client, shape: tuple[int, int]) -> None:
    """No token at all ([B, 0], [0, T]), with a mask, with lengths or neither: loss 0 and a
    gradient of the input's shape, as for an empty ragged batch (a mask of shape [B, 0] once
    raised numpy's ValueError in the client instead of calling)."""
    b = shape[0]
    lp = np.zeros(shape, np.float32)
    for layout in ({"mask": np.zeros(shape, bool)}, {"lengths": np.zeros(b, np.int64)}, {}):
        r = client.loss(lp, lp, advantages=np.ones(b, np.float32), **layout)
        assert (r.loss, r.grad.shape, r.metrics["num_tokens"]) == (0.0, shape, 0.0), layout
        lt = torch.zeros(shape, requires_grad=True)
        softgate_loss(lt, lt.detach(), client=client, advantages=np.ones(b, np.float32), **layout).backward()
        assert lt.grad is not None and lt.grad.shape == shape


def test_an_empty_ragged_batch_gives_loss_zero(client) -> None:
    """offsets [0] (no sequence at all) is a valid ragged batch: packed, sent and answered."""
    empty = np.zeros(0, np.float32)
    assert pack_batch(empty, offsets=[0], advantages=empty).layout.offsets.tolist() == [0]
    r = client.loss(empty, offsets=[0], advantages=empty)
    assert r.loss == 0.0 and r.grad.shape == (0,)


def test_empty_lists_of_rewards_and_groups_are_an_empty_call(client) -> None:
    """An audit: `advantages(rewards=[], group_ids=[])` was refused "group_ids: bad_dtype:
    float64" (numpy's dtype of []), though the server answers an empty batch."""
    r = client.advantages(rewards=[], group_ids=[])
    assert r.advantages.shape == (0,)
    with pytest.raises(InvalidArgumentError, match="group_ids: bad_dtype: float64"):
        client.advantages(rewards=[1.0], group_ids=[0.0])  # (a float id is still refused)


def test_outputs_are_read_only_in_every_layout(client) -> None:
    """Found by an audit: a padded batch with padding gave writable arrays, a full-length one,
    a ragged one (views of the response's bytes) read-only ones, so `r.grad *= s` failed only
    on the occasional all-truncated batch. Now every layout's outputs are read-only."""
    rng = np.random.default_rng(3)
    lp = -rng.random((4, 6)).astype(np.float32) - 0.1
    adv = np.array([1.0, -1.0, 0.5, 0.0], np.float32)
    lengths = np.array([6, 3, 6, 1])
    layouts = {
        "padded, padding": {"lengths": lengths},
        "padded, full": {},
        "ragged": {"offsets": np.arange(5) * 6},
        "ragged, streamed": {"offsets": np.arange(5) * 6, "stream": True},
    }
    for name, layout in layouts.items():
        x = lp.reshape(-1) if "offsets" in layout else lp
        r = client.loss(x, x - 0.01, advantages=adv, outputs=("ratio", "clip_mask"), **layout)
        for out in (r.grad, r.ratio, r.clip_mask):
            assert out is not None and not out.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            r.grad *= 2


def test_float64_torch_inputs_and_lengths(client) -> None:
    p = padded_batch(seed=3, dtype=np.float64)
    r, _ = ragged_of(p)
    lengths = np.diff(r["offsets"])
    ref = engine().loss(dataclasses.replace(engine_batch(r), ref_logp=None, rollout_logp=None), LossConfig())
    tp = {k: torch.from_numpy(v) for k, v in r.items()}
    res = client.loss(
        tp["logp"],
        tp["old_logp"],
        lengths=lengths,
        mask=tp["mask"],
        rewards=tp["rewards"],
        group_ids=tp["group_ids"],
    )
    assert res.grad.dtype == np.float64
    assert_same_as_engine(res, ref)


def test_caller_advantages_per_sequence_and_per_token(client) -> None:
    p = padded_batch(seed=4)
    r, valid = ragged_of(p)
    b = p["logp"].shape[0]
    seq_adv = np.linspace(-1, 1, b).astype(np.float32)
    tok_adv = np.broadcast_to(seq_adv[:, None], p["logp"].shape).copy()
    a = client.loss(p["logp"], p["old_logp"], mask=p["mask"], advantages=seq_adv, outputs=("advantages",))
    t = client.loss(p["logp"], p["old_logp"], mask=p["mask"], advantages=tok_adv, outputs=("advantages",))
    ref = engine().loss(
        Batch(
            logp=torch.from_numpy(r["logp"]),
            offsets=torch.from_numpy(r["offsets"]),
            old_logp=torch.from_numpy(r["old_logp"]),
            mask=torch.from_numpy(r["mask"]),
            advantages=torch.from_numpy(seq_adv),
        ),
        LossConfig(),
    )
    assert_same_as_engine(a, ref, valid)
    np.testing.assert_array_equal(a.grad, t.grad)
    np.testing.assert_array_equal(a.advantages[valid], tok_adv[valid])


@pytest.mark.parametrize("level, grad", [("sequence", [-1.0, -1.0]), ("token", [-0.5, -1.0])])
def test_an_explicit_advantage_level_reaches_the_server(client, level: str, grad: list[float]) -> None:
    """advantage_level is sent, unary and streamed: with B == N and unequal lengths the server
    cannot tell per-sequence from per-token advantages without it."""
    lp = np.array([-0.5, -1.0], np.float32)
    for stream in (False, True):
        r = client.loss(
            lp,
            offsets=[0, 0, 2],
            advantages=[1.0, 2.0],
            advantage_level=level,
            objective="reinforce",
            stream=stream,
        )
        assert r.grad.tolist() == grad


def test_an_empty_kl_section_sends_no_kl_term(client) -> None:
    """kl=KLConfig() with nothing set is no KL term: no ref_logp needed, the loss as without it."""
    assert cfg.build_loss_config(kl=KLConfig()).kl is None
    lp = -np.ones((2, 3), np.float32)
    r = client.loss(lp, lp - 0.1, advantages=[1.0, -1.0], kl=KLConfig())
    assert r.kl_loss == 0.0 and r.loss == client.loss(lp, lp - 0.1, advantages=[1.0, -1.0]).loss


def test_advantages_rpc_equals_engine(client) -> None:
    rng = np.random.default_rng(5)
    rewards = rng.random(24).astype(np.float32)
    gids = np.repeat(np.arange(6), 4)
    res = client.advantages(rewards, gids, estimator="rloo")
    ref = engine().advantages(torch.from_numpy(rewards), torch.from_numpy(gids), ec.AdvantageConfig("rloo"))
    np.testing.assert_array_equal(res.advantages, ref.advantages.numpy())
    assert res.metrics["num_groups"] == 6


def test_advantages_of_reward_components(client) -> None:
    """[B, K] rewards (numpy, or a torch tensor) with reward_weights (a list, an array): GDPO
    as the engine computes it; a weight count that does not match is the server's refusal."""
    rng = np.random.default_rng(6)
    rewards = rng.integers(0, 3, (24, 3)).astype(np.float32) / 2
    gids = np.repeat(np.arange(6), 4)
    counts = rng.integers(1, 9, 24)
    ref = engine().advantages(
        torch.from_numpy(rewards),
        torch.from_numpy(gids),
        ec.AdvantageConfig("gdpo", reward_weights=(1.0, 0.5, 2.0)),
        torch.from_numpy(counts),
    )
    for w in ([1.0, 0.5, 2.0], np.array([1.0, 0.5, 2.0])):
        res = client.advantages(rewards, gids, estimator="gdpo", reward_weights=w, token_counts=counts)
        np.testing.assert_array_equal(res.advantages, ref.advantages.numpy())
    res = client.advantages(torch.from_numpy(rewards), gids, estimator="gdpo", reward_weights=[1.0, 0.5, 2.0])
    assert res.advantages.shape == (24,)
    with pytest.raises(InvalidArgumentError) as err:
        client.advantages(rewards, gids, estimator="gdpo", reward_weights=[1.0])
    assert "config.reward_weights" in str(err.value) and "length_mismatch" in str(err.value)
    lp = -np.ones((24, 3), np.float32)
    with pytest.raises(InvalidArgumentError, match="K reward components go to advantages"):
        client.loss(lp, lp, rewards=rewards, group_ids=gids)
    # a reward function's None (NaN): skipped when asked, as the engine skips it
    rewards[[1, 6, 13], [0, 2, 1]] = np.nan
    skip = ec.AdvantageConfig("gdpo", skip_nan_components=True)
    ref = engine().advantages(torch.from_numpy(rewards), torch.from_numpy(gids), skip)
    res = client.advantages(rewards, gids, estimator="gdpo", skip_nan_components=True)
    np.testing.assert_array_equal(res.advantages, ref.advantages.numpy())
    res = client.advantages(rewards, gids, config=cfg.AdvantageConfig("gdpo", skip_nan_components=True))
    np.testing.assert_array_equal(res.advantages, ref.advantages.numpy())
    ref = engine().advantages(
        torch.from_numpy(rewards), torch.from_numpy(gids), ec.AdvantageConfig(skip_nan_components=True)
    )
    res = client.advantages(rewards, gids, skip_nan_components=True)  # (the one setting sent)
    np.testing.assert_array_equal(res.advantages, ref.advantages.numpy())
    with pytest.raises(InvalidArgumentError, match=r"rewards\[1\]: non_finite: value is NaN; set skip_nan"):
        client.advantages(rewards, gids, estimator="gdpo")
    with pytest.raises(InvalidArgumentError, match=r"config\.advantages\.skip_nan_components: bad_type"):
        cfg.AdvantageConfig("gdpo", skip_nan_components="yes")  # type: ignore[arg-type]


def test_loss_with_rewards_missing_equals_engine(client) -> None:
    """loss(skip_nan_components=True): a NaN reward is a sequence without one (advantage 0,
    out of its group's statistics), unary and streamed (the chunks' rewards are checked
    before the configuration is known) as the engine computes it."""
    p = padded_batch(seed=3)
    p["rewards"][[1, 6]] = np.nan
    r, valid = ragged_of(p)
    ref_cfg = LossConfig(advantages=ec.AdvantageConfig(skip_nan_components=True))
    ref = engine().loss(engine_batch(r), ref_cfg)
    assert not ref.advantages[ref.mask].isnan().any() and ref.advantages[ref.mask].any()
    args = {k: p[k] for k in ("old_logp", "mask", "rewards", "group_ids", "ref_logp", "rollout_logp")}
    for stream in (False, True):
        client.stream_chunk_bytes = 700 if stream else 4 << 20
        try:
            res = client.loss(p["logp"], **args, outputs=ALL_OUTPUTS, stream=stream, skip_nan_components=True)
        finally:
            client.stream_chunk_bytes = 4 << 20
        assert res.streamed == stream and (not stream or res.chunks > 2)
        assert_same_as_engine(res, ref, valid)
    with pytest.raises(InvalidArgumentError, match=r"rewards\[1\]: non_finite: value is NaN; set skip_nan"):
        client.loss(p["logp"], **args)


def test_micro_batches_with_rpc_advantages_equal_the_whole_batch(client) -> None:
    """reinforce_pp_baseline: advantages from ComputeAdvantages with each sequence's trained
    tokens, sent with two micro-batches under global normalisers, give the whole batch's loss
    and gradient (without token_counts the whitening weighed sequences, not tokens)."""
    rng = np.random.default_rng(7)
    lengths = np.array([4, 6, 3, 5, 2, 7, 4, 3])
    n = int(lengths.sum())
    lp = -rng.random(n).astype(np.float32)
    old = (lp - 0.05 * rng.random(n)).astype(np.float32)
    mask = rng.random(n) > 0.25
    rewards = rng.random(8).astype(np.float32)
    gids = np.repeat(np.arange(2), 4)
    ylen = np.add.reduceat(mask.astype(np.int64), np.r_[0, np.cumsum(lengths)[:-1]])
    adv = client.advantages(rewards, gids, estimator="reinforce_pp_baseline", token_counts=ylen).advantages
    counted_as_floats = client.advantages(  # (a float mask's mask.sum(-1))
        rewards, gids, estimator="reinforce_pp_baseline", token_counts=ylen.astype(np.float32)
    )
    np.testing.assert_array_equal(counted_as_floats.advantages, adv)
    whole = client.loss(
        lp,
        old,
        mask=mask,
        lengths=lengths,
        rewards=rewards,
        group_ids=gids,
        estimator="reinforce_pp_baseline",
        aggregation="token_mean",
    )
    cut = int(lengths[:4].sum())
    parts = [
        client.loss(
            lp[s:e],
            old[s:e],
            mask=mask[s:e],
            lengths=ls,
            advantages=a,
            aggregation="token_mean",
            num_tokens=int(mask.sum()),
        )
        for s, e, ls, a in ((0, cut, lengths[:4], adv[:4]), (cut, n, lengths[4:], adv[4:]))
    ]
    np.testing.assert_allclose(parts[0].loss + parts[1].loss, whole.loss, rtol=1e-6)
    np.testing.assert_allclose(np.concatenate([p.grad for p in parts]), whole.grad, rtol=1e-6, atol=0)
    with pytest.raises(InvalidArgumentError, match="token_counts"):
        client.advantages(rewards, gids, token_counts=ylen[:3])
    with pytest.raises(InvalidArgumentError, match=r"token_counts\[0\]: out_of_range"):
        client.advantages(rewards, gids, token_counts=-ylen)  # (the server's check)


def test_algorithms(client) -> None:
    cat = client.algorithms()
    names = [o.name for o in cat.objectives]
    assert names[0] == "sapo" and {"grpo", "gspo", "cispo", "gppo", "reinforce"} <= set(names)
    assert cat.limits.max_message_bytes > 0


# ---------------------------------------------------------------- torch adapter


def test_torch_backward_puts_engine_grad_on_padded_logp(client) -> None:
    p = padded_batch(seed=6)
    r, valid = ragged_of(p)
    ref = engine().loss(engine_batch(r), LossConfig())
    logp = torch.from_numpy(p["logp"]).requires_grad_()
    loss = softgate_loss(
        logp,
        torch.from_numpy(p["old_logp"]),
        client=client,
        mask=torch.from_numpy(p["mask"]),
        rewards=p["rewards"],
        group_ids=p["group_ids"],
    )
    assert loss.dim() == 0 and loss.dtype == torch.float32 and loss.requires_grad
    assert loss.item() == np.float32(ref.loss)
    (3 * loss).backward()
    expect = np.zeros_like(p["logp"])
    expect[valid] = ref.grad.numpy()
    np.testing.assert_array_equal(logp.grad.numpy(), 3 * expect)
    assert loss.softgate_result.metrics["num_groups"] == 3
    assert client.last_result is loss.softgate_result


def test_torch_ragged_return_result_and_graph(client) -> None:
    p = padded_batch(seed=7)
    r, _ = ragged_of(p)
    # logp comes out of a "model": gradients flow on to its parameters
    w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    logp = torch.from_numpy(r["logp"]).double() * w
    loss, result = softgate_loss(
        logp,
        r["old_logp"].astype(np.float64),
        client=client,
        offsets=r["offsets"],
        mask=r["mask"],
        rewards=r["rewards"],
        group_ids=r["group_ids"],
        return_result=True,
    )
    loss.backward()
    expect = float((result.grad * r["logp"].astype(np.float64)).sum())
    assert w.grad is not None and w.grad.item() == pytest.approx(expect, rel=1e-12)


def test_softgate_loss_is_the_total_loss_kl_included(client) -> None:
    """The returned scalar is result.loss (policy + KL), not result.policy_loss, in logp's dtype."""
    lp = -torch.rand(2, 3, dtype=torch.float64) - 0.1
    loss = softgate_loss(lp, lp - 0.2, client=client, advantages=[1.0, -1.0], ref_logp=lp - 0.5, kl_beta=0.5)
    r = loss.softgate_result
    assert r.kl_loss != 0.0 and loss.item() == r.loss and loss.dtype == torch.float64


class RecordingClient:
    """Stands for a SoftgateClient: records the arguments of `loss` and answers a fixed result."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def loss(self, logp: Any, old_logp: Any = None, **kw: Any) -> LossResult:
        self.calls.append((logp, old_logp, kw))
        return LossResult(loss=1.5, policy_loss=1.0, kl_loss=0.5, grad=np.full(tuple(logp.shape), 2.0))


def test_softgate_loss_hands_every_argument_on_to_the_client() -> None:
    """lengths, ref_logp, rollout_logp, timeout and the loss options all reach client.loss."""
    rec = RecordingClient()
    lp = torch.zeros(4, requires_grad=True)
    args = {"lengths": [1, 3], "ref_logp": "ref", "rollout_logp": "rollout", "advantages": "adv"}
    loss = softgate_loss(lp, "old", client=rec, timeout=7.5, objective="grpo", **args)  # type: ignore[arg-type]
    (got,) = rec.calls
    assert got[1] == "old" and got[2]["timeout"] == 7.5 and got[2]["objective"] == "grpo"
    assert {k: got[2][k] for k in args} == args
    assert got[2]["mask"] is None and got[2]["offsets"] is None
    loss.backward()
    assert loss.item() == 1.5 and lp.grad is not None and lp.grad.tolist() == [2.0] * 4


def test_softgate_loss_refuses_a_logp_that_is_not_a_tensor() -> None:
    """A numpy logp is a TypeError naming the requirement, raised before any call."""
    rec = RecordingClient()
    with pytest.raises(TypeError, match=r"logp must be a torch\.Tensor"):
        softgate_loss(np.zeros(3), client=rec, offsets=[0, 3], advantages=[1.0])  # type: ignore[arg-type]
    assert rec.calls == []


@pytest.mark.parametrize("objective", ["reinforce", "sapo"])
def test_torch_adapter_matches_autograd_of_the_loss(client, objective) -> None:
    """For a simple case, the service gradient equals torch autograd of the closed-form loss."""
    rng = np.random.default_rng(8)
    b, t = 6, 10
    logp_np = (-rng.random((b, t)) - 0.1).astype(np.float64)
    old_np = np.minimum(logp_np + rng.standard_normal((b, t)) * 0.3, -1e-3)
    adv = rng.standard_normal(b).astype(np.float64)
    lengths = np.array([10, 7, 3, 10, 1, 5])
    mask = np.arange(t)[None, :] < lengths[:, None]

    logp = torch.tensor(logp_np, requires_grad=True)
    svc = softgate_loss(logp, old_np, client=client, mask=mask, advantages=adv, objective=objective)
    svc.backward()

    x = torch.tensor(logp_np, requires_grad=True)
    ratio = torch.exp(x - torch.from_numpy(old_np))
    a = torch.from_numpy(adv)[:, None].expand(b, t)
    if objective == "reinforce":
        per_tok = -ratio * a
    else:
        tau = torch.where(
            a > 0, torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.05, dtype=torch.float64)
        )
        per_tok = -(4 / tau) * torch.sigmoid(tau * (ratio - 1)) * a
    m = torch.from_numpy(mask).double()
    ref = ((per_tok * m).sum(1) / m.sum(1)).mean()  # seq_mean_token_mean
    ref.backward()
    assert svc.item() == pytest.approx(ref.item(), rel=1e-12)
    np.testing.assert_allclose(logp.grad.numpy(), x.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_torch_adapter_refuses_a_second_derivative(client) -> None:
    """The service gives d loss / d logp only: a gradient penalty through softgate_loss (any
    derivative of its gradient) raises instead of silently dropping the second-order terms.
    A backward with create_graph=True alone gives the first derivative, as without it."""
    torch.manual_seed(0)
    w = torch.randn(5, 11, requires_grad=True)
    x, ids = torch.randn(4, 7, 5), torch.randint(0, 11, (4, 7))
    logp = (x @ w).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
    loss = softgate_loss(
        logp, logp.detach() - 0.3, client=client, advantages=torch.tensor([1.0, -1.0, 2.0, -2.0])
    )
    (penalised,) = torch.autograd.grad(loss, w, create_graph=True, retain_graph=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        penalised.pow(2).sum().backward()
    (g,) = torch.autograd.grad(loss, w)  # first order: as before
    assert torch.isfinite(g).all() and g.abs().sum() > 0 and torch.equal(g, penalised.detach())


def test_torch_compile_of_a_step_calling_softgate_loss_breaks_the_graph_there(client) -> None:
    """Found by an audit: torch.compile of a training step that calls softgate_loss crashed
    (dynamo stepped into the client and failed on the response's read-only buffers). The call
    is a graph break now: compiled and eager give the same loss and gradient, and each compiled
    call asks the service again."""
    torch.manual_seed(0)
    x, ids = torch.randn(4, 6, 5), torch.randint(0, 11, (4, 6))
    adv, old = torch.tensor([1.0, -1.0, 0.5, 2.0]), torch.full((4, 6), -2.3)

    def step(w: torch.Tensor) -> torch.Tensor:
        logp = (x @ w).log_softmax(-1).gather(-1, ids[..., None]).squeeze(-1)
        return softgate_loss(logp, old, client=client, advantages=adv)

    w0 = torch.randn(5, 11)
    compiled = torch.compile(step, backend="eager")
    for scale in (1.0, 0.5):  # a second call with new weights computes anew
        we, wc = (w0 * scale).requires_grad_(), (w0 * scale).requires_grad_()
        eager, comp = step(we), compiled(wc)
        eager.backward()
        comp.backward()
        assert comp.item() == eager.item() and comp.softgate_result.metrics == eager.softgate_result.metrics
        assert torch.equal(wc.grad, we.grad)


def test_a_tensor_option_is_read_at_every_call(client) -> None:
    """Found by an audit: the client remembers the configurations it built, keyed by the
    options, and a tensor option (a normaliser all_reduced in place each step) is keyed by
    its identity: every later call reused its first value, a silently mis-scaled gradient."""
    p = padded_batch(seed=5)
    kw = {
        "mask": p["mask"],
        "rewards": p["rewards"],
        "group_ids": p["group_ids"],
        "aggregation": "token_mean",
    }
    n = torch.tensor(100.0)
    first = client.loss(p["logp"], p["old_logp"], num_tokens=n, **kw).loss
    n.fill_(200.0)
    assert client.loss(p["logp"], p["old_logp"], num_tokens=n, **kw).loss == pytest.approx(
        first / 2, rel=1e-6
    )
    assert client.loss(p["logp"], p["old_logp"], num_tokens=np.float64(50.0), **kw).loss == pytest.approx(
        first * 2, rel=1e-6
    )
    # only numbers are read out: a one-string array stays what it was (it became "ratio", split)
    assert set(cfg.LossConfig(outputs=np.array(["ratio"])).outputs) == {"ratio"}
    # an option object reads a one-element tensor when it is built: the Python float it held then
    tau = torch.tensor(2.0)
    obj = cfg.Objective("sapo", {"tau_pos": tau})
    tau.fill_(5.0)
    assert obj.params == {"tau_pos": 2.0} and type(obj.params["tau_pos"]) is float
    eps = torch.tensor(1e-3, dtype=torch.float64)
    adv = cfg.AdvantageConfig(eps=eps, min_group_std=np.float32(0.5))
    eps.fill_(7.0)
    assert (adv.eps, adv.min_group_std) == (1e-3, 0.5) and type(adv.eps) is float


def test_the_client_api_in_process_with_no_server_to_deploy() -> None:
    """README: `in_process_server()` gives softgate_loss and SoftgateClient a server in the
    trainer's own process; the gradient is the engine's."""
    from softgate.grpc.in_process import in_process_server
    from softgate_client import SoftgateClient

    p = padded_batch(seed=11)
    r, valid = ragged_of(p)
    ref = engine().loss(engine_batch(r), LossConfig())
    with in_process_server(engine()) as target, SoftgateClient(target) as c:
        logp = torch.from_numpy(p["logp"]).requires_grad_()
        loss = softgate_loss(
            logp, p["old_logp"], client=c, mask=p["mask"], rewards=p["rewards"], group_ids=p["group_ids"]
        )
        loss.backward()
    expect = np.zeros_like(p["logp"])
    expect[valid] = ref.grad.numpy()
    np.testing.assert_array_equal(logp.grad.numpy(), expect)


# ---------------------------------------------------------------- errors, retries, TLS


def test_bad_request_field_violations(client) -> None:
    p = padded_batch(seed=9)
    r, _ = ragged_of(p)
    r["logp"][17] = np.nan
    with pytest.raises(InvalidArgumentError) as ei:
        client.loss(
            r["logp"], r["old_logp"], offsets=r["offsets"], rewards=r["rewards"], group_ids=r["group_ids"]
        )
    err = ei.value
    assert any(v.field == "batch.logp[17]" and v.reason == "non_finite" for v in err.violations), (
        err.violations
    )
    assert "batch.logp[17]: non_finite" in str(err)

    with pytest.raises(InvalidArgumentError) as ei:
        client.loss(
            r["logp"] * 0 - 1, offsets=r["offsets"], advantages=np.ones(len(r["offsets"]) - 1), tau_pos=-1.0
        )
    assert any(v.field == "config.objective.sapo.tau_pos" for v in ei.value.violations), ei.value.violations


def test_violations_of_a_padded_batch_name_the_callers_row_and_column(client) -> None:
    logp = -np.ones((3, 5), np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0]], bool)
    old = logp.copy()
    old[0, 1] = np.inf  # token 1 of the ragged batch sent (rows cut at their last mask = 1)
    logp[2, 1] = np.nan  # token 3
    first = -np.ones((3, 5), np.float32)
    first[2, 0] = np.nan  # token 2: a row's first token, after an empty row (mutation testing)
    for lp, ol, field, where in [
        (first, None, "batch.logp[2]", "(row 2, column 0 of the padded input)"),
        (-np.ones((3, 5), np.float32), old, "batch.old_logp[1]", "(row 0, column 1 of the padded input)"),
        (logp, None, "batch.logp[3]", "(row 2, column 1 of the padded input)"),
    ]:
        with pytest.raises(InvalidArgumentError) as ei:
            client.loss(lp, ol, mask=mask, advantages=[1.0, -1.0, 1.0])
        (v,) = ei.value.violations
        assert v.field == field and v.reason == "non_finite" and v.description.endswith(where), v
        assert where in str(ei.value)
    # a ragged batch's indices are the caller's own
    with pytest.raises(InvalidArgumentError) as ei:
        client.loss(logp[mask], offsets=[0, 2, 2, 6], advantages=[1.0, -1.0, 1.0])
    assert [str(v) for v in ei.value.violations] == ["batch.logp[3]: non_finite: value is NaN"]


def test_violations_of_a_streamed_batch_name_the_batch_not_the_chunk(server) -> None:
    """The client cut the stream, so it names a violation as a unary call would: in the batch the
    caller passed (and in the padded input), with the chunk the server saw in the description."""
    logp = -np.ones((4, 5), np.float32)
    mask = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], bool)
    logp[2, 1] = np.nan  # token 3 of the ragged batch, chunk 2 (one sequence a chunk) token 1
    old = -np.ones((4, 5), np.float32)
    old[3, 2] = np.inf  # token 8, chunk 3 token 2
    rewards = np.array([1.0, 0.0, np.nan, 1.0])
    with SoftgateClient(f"127.0.0.1:{server.port}", timeout=60, stream_chunk_bytes=64) as c:
        for lp, ol, field, description in [
            (logp, None, "batch.logp[3]", "non_finite: value is NaN (in chunk[2].logp[1] of the stream)"),
            (
                -np.ones((4, 5), np.float32),
                old,
                "batch.old_logp[8]",
                "non_finite: value is infinite (in chunk[3].old_logp[2] of the stream)",
            ),
        ]:
            with pytest.raises(InvalidArgumentError) as ei:
                c.loss(lp, ol, mask=mask, advantages=[1.0, -1.0, 1.0, 1.0], stream=True)
            (v,) = ei.value.violations
            row, col = ((2, 1), (3, 2))[field.startswith("batch.old")]
            assert (v.field, v.description) == (
                field,
                f"{description} (row {row}, column {col} of the padded input)",
            )
            # the first line says what the violations below it say (it named the chunk's place)
            assert str(ei.value).splitlines()[0] == f"INVALID_ARGUMENT: invalid input: {v}"
        ragged = -np.ones(9, np.float32)
        with pytest.raises(InvalidArgumentError) as ei:  # per-sequence fields count sequences
            c.loss(ragged, offsets=[0, 2, 2, 6, 9], rewards=rewards, group_ids=[0, 0, 1, 1], stream=True)
        assert [v.field for v in ei.value.violations] == ["batch.rewards[2]"], ei.value.violations
        with pytest.raises(InvalidArgumentError) as unary:
            c.loss(ragged, offsets=[0, 2, 2, 6, 9], rewards=rewards, group_ids=[0, 0, 1, 1], stream=False)
        assert [v.field for v in unary.value.violations] == ["batch.rewards[2]"]


def test_client_side_refusals_look_like_server_ones(client) -> None:
    logp = torch.zeros(4, 5, dtype=torch.bfloat16) - 1
    with pytest.raises(InvalidArgumentError) as ei:
        client.loss(logp, advantages=np.ones(4))
    assert ei.value.violations[0].field == "batch.logp" and ei.value.reasons == ["half_precision"]
    with pytest.raises(InvalidArgumentError, match=r"batch\.old_logp: bad_shape"):
        client.loss(np.zeros((4, 5), np.float32) - 1, np.zeros((4, 6), np.float32), advantages=np.ones(4))
    with pytest.raises(InvalidArgumentError, match=r"config\.advantages\.estimator: unknown_choice"):
        client.loss(np.zeros((4, 5), np.float32) - 1, advantages=np.ones(4), estimator="nope")


def test_retry_until_server_starts() -> None:
    port = free_port()
    late = ServerThread(port=port)
    starter = threading.Timer(1.0, late.start)
    starter.start()
    try:
        with SoftgateClient(
            f"127.0.0.1:{port}",
            retries=RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.3),
            timeout=30,
        ) as c:
            t0 = time.monotonic()
            res = c.loss(np.full(8, -1.0, np.float32), lengths=[4, 4], advantages=[1.0, -1.0])
            assert time.monotonic() - t0 >= 0.5
        assert np.isfinite(res.loss)
    finally:
        starter.join()
        late.stop()


def test_retry_on_unavailable_from_interceptor() -> None:
    import grpc

    class FailFirst(grpc.aio.ServerInterceptor):
        def __init__(self, n: int) -> None:
            self.left = n
            self.calls = 0

        async def intercept_service(self, continuation, handler_call_details):
            self.calls += 1
            if self.left > 0:
                self.left -= 1

                async def unavailable(request, context):
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "draining")

                return grpc.unary_unary_rpc_method_handler(unavailable)
            return await continuation(handler_call_details)

    icpt = FailFirst(3)
    with ServerThread(interceptors=[icpt]) as s:
        with SoftgateClient(
            f"127.0.0.1:{s.port}", retries=RetryPolicy(max_attempts=5, initial_backoff=0.01)
        ) as c:
            res = c.loss(np.full(8, -1.0, np.float32), lengths=[4, 4], advantages=[1.0, -1.0])
        assert np.isfinite(res.loss) and icpt.calls == 4
        icpt.left = 10
        with (
            SoftgateClient(f"127.0.0.1:{s.port}", retries=2) as c,
            pytest.raises(UnavailableError, match="draining"),
        ):
            c.loss(np.full(8, -1.0, np.float32), lengths=[4, 4], advantages=[1.0, -1.0])


@pytest.mark.parametrize("mutual", [False, True])
def test_tls_and_mtls(mutual) -> None:
    import grpc
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    key_pem = cert.private_key_pem.bytes()
    chain_pem = b"".join(b.bytes() for b in cert.cert_chain_pems)
    client_cert = ca.issue_cert("trainer@example.org")
    creds = grpc.ssl_server_credentials(
        [(key_pem, chain_pem)],
        root_certificates=ca.cert_pem.bytes() if mutual else None,
        require_client_auth=mutual,
    )
    with ServerThread(server_credentials=creds) as s:
        kw = {}
        if mutual:
            kw = {
                "client_cert": b"".join(b.bytes() for b in client_cert.cert_chain_pems),
                "client_key": client_cert.private_key_pem.bytes(),
            }
        with SoftgateClient(
            f"localhost:{s.port}", tls=True, root_certificates=ca.cert_pem.bytes(), retries=1, **kw
        ) as c:
            res = c.loss(np.full(8, -1.0, np.float32), lengths=[4, 4], advantages=[1.0, -1.0])
            assert np.isfinite(res.loss)
        # without the CA the handshake fails (UNAVAILABLE, not retried forever)
        with (
            SoftgateClient(f"localhost:{s.port}", tls=True, retries=1, timeout=5) as c,
            pytest.raises(UnavailableError),
        ):
            c.algorithms()
        if mutual:  # no client certificate: refused
            with (
                SoftgateClient(
                    f"localhost:{s.port}",
                    tls=True,
                    root_certificates=ca.cert_pem.bytes(),
                    retries=1,
                    timeout=5,
                ) as c,
                pytest.raises(UnavailableError),
            ):
                c.algorithms()


def test_a_run_name_outside_printable_ascii_still_calls(server):
    """gRPC refuses non-ASCII metadata in the client (INTERNAL on every call); the client sends
    the label the server would make of the name (docs/observability.md: other characters -> _)."""
    p = padded_batch(3, b=8, t=6)
    args = (p["logp"], p["old_logp"])
    kw = {"mask": p["mask"], "rewards": p["rewards"], "group_ids": p["group_ids"]}
    with SoftgateClient(f"127.0.0.1:{server.port}", run="exp-ü 1\n", timeout=60) as c:
        c.loss(*args, **kw)
        c.loss(*args, run="team/exp:2 ✓", **kw)
        assert c._metadata(None) == (("softgate-run", "exp-__1"),)


class Runs(Telemetry):
    def __init__(self) -> None:
        self.runs: list[str] = []

    def request_started(self, rpc: str, run: str, tokens: int) -> None:
        self.runs.append(run)


def test_a_calls_run_overrides_the_clients(inprocess_server: Any) -> None:
    """`run=` of a call labels that call; without it the client's run does."""
    srv = inprocess_server()
    tel = Runs()
    srv.grpc_server.servicer.telemetry = tel
    logp, off, adv = -np.ones(8), np.array([0, 4, 8]), np.array([1.0, -1.0])
    with SoftgateClient(srv.target, run="client-run") as c:
        c.loss(logp, offsets=off, advantages=adv, run="call-run")
        c.loss(logp, offsets=off, advantages=adv)
        c.advantages(np.array([1.0, 0.0]), np.array([0, 0]), run="adv-run")
    assert tel.runs == ["call-run", "client-run", "adv-run"]


def test_root_certificates_alone_mean_tls(monkeypatch: pytest.MonkeyPatch, certs: Any) -> None:
    """passing root_certificates (or a client certificate) turns TLS on without tls=True."""
    import softgate_client._channel as chmod

    made: list[str] = []
    monkeypatch.setattr(chmod.grpc, "insecure_channel", lambda target, options=None: made.append("insecure"))
    monkeypatch.setattr(
        chmod.grpc, "secure_channel", lambda target, creds, options=None: made.append("secure")
    )
    monkeypatch.setattr(chmod.grpc, "ssl_channel_credentials", lambda **kw: kw)
    pem = certs.ca_pem
    base = {"tls": False, "root_certificates": None, "client_cert": None, "client_key": None}
    for kw in ({"root_certificates": pem}, {"tls": True}, {}):
        chmod.make_channel("127.0.0.1:1", max_message_bytes=1 << 20, **{**base, **kw})
    assert made == ["secure", "secure", "insecure"]


def test_the_client_lists_the_engine_s_reward_kl_estimators() -> None:
    """The client names a KL in the reward's estimators when it refuses an unknown one."""
    from softgate_client.client import REWARD_KL_CHOICES

    assert list(ec.REWARD_KL_ESTIMATORS) == REWARD_KL_CHOICES
