"""The eager kernel in slices of tokens (engine/chunked.py) equals the whole kernel."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from conftest import kernel_args
from softgate.engine import Batch, Engine, RejectionCriterion, chunked, kernel
from softgate.engine.buckets import BUCKET_SUMS
from softgate.engine.chunked import chunked_token_terms
from softgate.engine.config import RewardKLConfig
from softgate.engine.errors import InputError
from softgate.engine.kernel import terms_layout, token_terms
from softgate.engine.loss import compute_loss

try:
    from tests.reference_loss import OBJECTIVE_NAMES, PER_SEQUENCE_ADVANTAGES, make_config, random_batch
except ImportError:  # tests/ is not a package from this rootdir
    from reference_loss import OBJECTIVE_NAMES, PER_SEQUENCE_ADVANTAGES, make_config, random_batch  # type: ignore[no-redef]

CONFIGS = [  # (KL, mismatch, advantages)
    (None, None, "rewards"),
    ("k3", ("token", "truncate"), "token"),
    ("k1", ("sequence", "mask"), "sequence"),
    ("k3_is_seq", ("token", "seq_mask"), "rewards"),
]


def _assert_same_terms(got: tuple[Any, ...], want: tuple[Any, ...], args: tuple[Any, ...]) -> None:
    """Per-token values equal up to their last bits, masks and codes and counts exactly, sums to
    float64 rounding."""
    for i, (g, w) in enumerate(zip(got[:7], want[:7], strict=True)):
        assert g.dtype == w.dtype and g.shape == w.shape, i
        if g.is_floating_point():
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-15)
        else:
            assert torch.equal(g, w), i
    t, codes = args[0], args[9]
    sums, counts, seq = terms_layout(*args[:7])
    g, w = got[7], want[7]
    assert g.shape == w.shape
    k = len(sums)
    torch.testing.assert_close(g[:k], w[:k], rtol=1e-12, atol=1e-15, equal_nan=True)
    end = k + len(counts) + len(seq)
    assert torch.equal(g[k:end], w[k:end]), "counts and per-sequence terms"
    nb = len(BUCKET_SUMS) if codes else 0
    torch.testing.assert_close(g[end : end + nb], w[end : end + nb], rtol=1e-12, atol=1e-15)
    assert not g[end + nb :].any() and g.numel() == end + nb + t["ylen"].numel()


def _gpu_code_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device-generic code a GPU runs (gathers by sequence id in the kernel), on the CPU."""
    from softgate.engine import aggregate, loss, segments, validation

    for m in (segments, loss, aggregate, validation, chunked):
        monkeypatch.setattr(m, "host_shortcuts", lambda device: False)


@pytest.mark.parametrize("name", OBJECTIVE_NAMES)
@pytest.mark.parametrize("kl,mm,adv", CONFIGS)
@pytest.mark.parametrize("sample_tokens", [None, 40], ids=["full", "sampled"])
@pytest.mark.parametrize("path", ["host", "gpu"])
def test_slices_equal_the_whole_kernel(
    name: str,
    kl: Any,
    mm: Any,
    adv: str,
    sample_tokens: int | None,
    path: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if name in PER_SEQUENCE_ADVANTAGES and adv == "token":
        adv = "sequence"
    if path == "gpu":
        _gpu_code_path(monkeypatch)
    batch = random_batch(3, max_seqs=30, max_len=40, advantages=adv, big_deltas=True)
    cfg = make_config(name, "seq_mean_token_mean", kl, mm, variant=1)
    args = kernel_args(batch, cfg, sample_tokens)
    n = args[0]["logp"].numel()
    assert n > 300 and (args[8] > 1) == (sample_tokens is not None)
    assert ("ids" in args[0]) == (path == "gpu")  # (a weight per sequence: gathered there)
    want = token_terms(*args)
    for chunk in (37, 128, n // 2):  # (37: not a multiple of the stride; n // 2: one slice, whole)
        _assert_same_terms(chunked_token_terms(*args, chunk=chunk), want, args)
    out = torch.full_like(args[0]["logp"], float("nan"))
    got = chunked_token_terms({**args[0], "grad_out": out}, *args[1:], chunk=37)
    assert got[0].data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, want[0], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", ["sapo", "grpo", "gspo"])
@pytest.mark.parametrize("path", ["host", "gpu"])
def test_the_sampler_kl_over_the_mask_as_sent(name: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With rollout rejection the kernel sums the sampler's KL over the mask as sent ("ms"),
    not the mask left: slices add up to the whole kernel's sums, which are k1 = rollout - old
    and k3 = exp(d) - 1 - d of d = old - rollout clamped, over the tokens sent."""
    from softgate.engine import RejectionCriterion

    if path == "gpu":
        _gpu_code_path(monkeypatch)
    batch = random_batch(7, max_seqs=30, max_len=40, advantages="rewards", big_deltas=True)
    rejection = (RejectionCriterion(1.3, "k1", "token", 0.7), RejectionCriterion(0.05, "k3", "seq_mean"))
    cfg = make_config(name, "token_mean", None, None, variant=1, rejection=rejection)
    args = kernel_args(batch, cfg)
    t = args[0]
    sent, left = t["ms"].view(torch.bool), t["m"].view(torch.bool)
    assert bool((sent & ~left).any()) and bool((left & ~sent).sum() == 0)
    want = token_terms(*args)
    for chunk in (37, 128):
        _assert_same_terms(chunked_token_terms(*args, chunk=chunk), want, args)
    sums = terms_layout(*args[:7])[0]
    d = (t["old"] - t["rollout"]).to(torch.float64)[sent]
    dc = d.clamp(-cfg.log_ratio_clamp, cfg.log_ratio_clamp)
    k1, k3 = want[7][sums.index("rollout_k1")], want[7][sums.index("rollout_k3")]
    assert float(k1) == pytest.approx(float(-d.sum()), rel=1e-6)
    assert float(k3) == pytest.approx(float((torch.expm1(dc) - dc).sum()), rel=1e-6)


def test_the_host_slices_large_batches_and_a_gpu_runs_them_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def counted(t: dict[str, Any], *rest: Any) -> Any:
        calls.append(t["logp"].numel())
        return token_terms(t, *rest)

    monkeypatch.setattr(chunked, "token_terms", counted)
    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 64)
    batch = random_batch(5, max_seqs=30, max_len=40)
    cfg = make_config("sapo", "token_mean", "k3", None)
    n = batch.logp.numel()
    got = Engine(device="cpu", compile=False).loss(batch, cfg)
    assert calls == [64] * (n // 64) + [n % 64] * (n % 64 > 0)
    calls.clear()
    want = compute_loss(batch, cfg, kernel=token_terms)
    assert not calls
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(got.gate_weight, want.gate_weight, rtol=1e-12, atol=1e-15)
    assert got.loss == pytest.approx(want.loss, rel=1e-12)
    assert got.metrics == pytest.approx(want.metrics, rel=1e-12, abs=1e-15)
    small = random_batch(5, max_seqs=2, max_len=40)  # at most 2 slices' worth: whole
    compute_loss(small, cfg)
    assert calls == [small.logp.numel()] and small.logp.numel() <= 128
    calls.clear()
    monkeypatch.setattr(chunked, "host_shortcuts", lambda device: False)  # a GPU's tensors
    compute_loss(batch, cfg)
    assert calls == [n]


def test_token_keys_are_the_sliced_entries() -> None:
    args = kernel_args(
        random_batch(4, max_seqs=9, max_len=9, advantages="sequence"),
        make_config("gspo", "seq_mean_token_mean", "k3", ("sequence", "truncate")),
        None,
    )
    t = args[0]
    keys = kernel.token_keys(t, args[4])
    n = t["logp"].numel()
    assert all(t[k].numel() == n for k in keys)
    assert {"logp", "old", "adv_tok", "w_tok", "sratio_tok", "lvseq_tok", "ref"} <= set(keys)
    assert not {"ylen", "adv", "sratio", "sclamped"} & set(keys)


def _spi(batch: Batch) -> Batch:
    """`batch` with a sum_pi_squared in [pi^2, 1]: the variance proxy and OTB read it."""
    own = torch.exp(batch.old_logp.to(torch.float64).clamp(max=0)).square()
    g = torch.Generator().manual_seed(1)
    return dataclasses.replace(
        batch, sum_pi_squared=(own + (1 - own) * torch.rand(own.numel(), generator=g)).to(batch.logp.dtype)
    )


SLICED_CASES = [  # objective, aggregation, kl, mismatch, estimator, extras
    (
        "grpo",
        "token_sum_norm",
        "k3@ratio",
        ("sequence", "truncate"),
        "reinforce_pp",
        {"bn": True, "rkl": "token"},
    ),
    ("sapo", "seq_mean_token_sum", "k2", ("geometric", "mask"), "optimal_token_baseline", {"opsm": 0.05}),
    (
        "kl_cov",
        "token_mean",
        "abs@sampler_ratio",
        ("token", "seq_mask"),
        "rloo",
        {"rej": True, "rkl": "sequence"},
    ),
    (
        "gspo",
        "seq_mean_token_mean",
        "k3_is_seq",
        ("token", "truncate"),
        "grpo",
        {"kl_agg": "token_mean", "bn": True},
    ),
    ("dro", "token_mean", "k1@score", None, "reinforce_pp_baseline", {"rkl": "immediate", "opsm": 0.1}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", SLICED_CASES, ids=[c[0] for c in SLICED_CASES])
def test_sliced_compute_loss_equals_whole(
    case: tuple[Any, ...], dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The features the test above leaves out, batch-global ones included (OPSM, a batch
    normalisation, the KL's own aggregation, a KL in the reward, the optimal token baseline):
    computed on the whole batch before the kernel runs in slices (an audit)."""
    name, agg, kl, mm, est, ex = case
    batch = _spi(random_batch(3, max_seqs=60, max_len=60, big_deltas=True, dtype=dtype))
    rej = (RejectionCriterion(1.5, "k1", "token", 0.7),) if ex.get("rej") else ()
    cfg = make_config(name, agg, kl, mm, estimator=est, opsm=ex.get("opsm"), rejection=rej, variant=1)
    if ex.get("bn"):
        cfg = dataclasses.replace(cfg, mismatch=dataclasses.replace(cfg.mismatch, batch_normalize=True))
    if ex.get("kl_agg"):
        cfg = dataclasses.replace(cfg, kl=dataclasses.replace(cfg.kl, aggregation=ex["kl_agg"]))
    if ex.get("rkl"):
        cfg = dataclasses.replace(cfg, reward_kl=RewardKLConfig(beta=0.05, level=ex["rkl"]))
    want = compute_loss(batch, cfg, kernel=token_terms, sample_tokens=40)
    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 37)
    got = compute_loss(batch, cfg, sample_tokens=40)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for f in ("grad", "advantages", "ratio", "gate_weight"):
        torch.testing.assert_close(getattr(got, f), getattr(want, f), rtol=tol, atol=0)
    for f in ("clip_mask", "ratio_bucket", "gate_bucket"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    for k, w in want.metrics.items():
        assert math.isclose(got.metrics[k], w, rel_tol=tol, abs_tol=1e-12), k


def test_a_bad_value_in_a_later_slice_is_named_by_its_batch_index(monkeypatch: pytest.MonkeyPatch) -> None:
    batch = random_batch(4, max_seqs=60, max_len=60, advantages="token")
    n = batch.logp.numel()
    monkeypatch.setattr(chunked, "CHUNK_TOKENS", 64)
    assert n > 3 * 64
    for i in (2 * 64 + 5, n - 1):
        batch.mask[i] = True
        logp = batch.logp.clone()
        logp[i] = float("nan")
        with pytest.raises(InputError) as e:
            compute_loss(dataclasses.replace(batch, logp=logp), make_config("grpo", "token_mean", None, None))
        assert [(v.field, v.index) for v in e.value.violations] == [("logp", i)]
