"""Test oracle: SPEC.md's loss written plainly, per sequence, in float64 with torch autograd.

Independent of softgate.engine's implementation on purpose: Python loops over groups and
sequences, masked tokens dropped by indexing (never multiplied), the policy objectives written
as SPEC states them (max/min/clip, stop-gradient by .detach()). The gradient is what
torch.autograd gives for this loss. Used by the property tests only, never at serving time.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import pytest
import torch
from softgate.engine import ESTIMATORS, METRIC_NAMES, Batch, LossConfig, MismatchConfig
from torch import Tensor

# the estimators of one advantage per sequence (ComputeAdvantages'); optimal_token_baseline
# makes one per token from the tokens' probabilities (tests/test_token_baseline.py)
SEQUENCE_ESTIMATORS = tuple(e for e in ESTIMATORS if e != "optimal_token_baseline")
# refused as unsupported: reinforce_pp reads no groups; gdpo's batch normalisation is its whitening;
# the leave-one-out std goes with rloo's leave-one-out baseline only; optimal_token_baseline divides by none
REFUSED_SCALES = (
    {("reinforce_pp", "group"), ("gdpo", "batch")}
    | {(e, "leave_one_out") for e in ESTIMATORS if e != "rloo"}
    | {("optimal_token_baseline", s) for s in ("group", "batch")}
)
# no group baseline per sequence (optimal_token_baseline's is per token: _reference_token_baseline)
RAW = ("reinforce_pp", "optimal_token_baseline")
# SPEC: only grpo, grpo_passk and gdpo divide by the group std unless `scale` says otherwise
EPS_DEFAULT_SCALE = {e: "group" if e in ("grpo", "grpo_passk", "gdpo") else "none" for e in ESTIMATORS}


def reference_advantages(
    rewards: list[float], groups: list[int], cfg, token_counts: list[int] | None = None, whiten: bool = True
) -> tuple[list[float], float]:
    """Per-sequence advantages and the degenerate-group share, by plain loops (`whiten=False`:
    before the whitening estimators' whitening)."""
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    adv = [0.0] * len(rewards)
    degenerate_seq = [False] * len(rewards)
    n_degenerate = 0
    scale = cfg.scale or EPS_DEFAULT_SCALE[cfg.estimator]
    batch_std = statistics.stdev(rewards) if len(rewards) > 1 else 0.0
    weights = token_counts if token_counts is not None else [1] * len(rewards)
    # gpg: B / the rewards that are not 0
    alpha = len(rewards) / max(1, sum(1 for x in rewards if x != 0))
    for idx in members.values():
        rs = [rewards[i] for i in idx]
        n = len(rs)
        mean = math.fsum(rs) / n
        std = math.sqrt(math.fsum((x - mean) ** 2 for x in rs) / (n - 1)) if n > 1 else 0.0
        if n == 1 or max(rs) == min(rs) or std < cfg.min_group_std:
            n_degenerate += 1
            if cfg.estimator not in RAW:  # (no group baseline: its members keep their R)
                for i in idx:
                    degenerate_seq[i] = True
                continue
        # opo: the mean weighted by trained tokens (the plain mean where they sum to 0)
        ws = [weights[i] for i in idx]
        baseline = math.fsum(w * x for w, x in zip(ws, rs, strict=True)) / sum(ws) if sum(ws) > 0 else mean
        for i in idx:
            a = rewards[i] - mean
            if cfg.estimator in RAW:
                a = rewards[i]
            elif cfg.estimator == "rloo":
                a = a * n / (n - 1)
            elif cfg.estimator == "opo":
                a = rewards[i] - baseline
            elif cfg.estimator == "gpg":
                a = a * alpha
            elif cfg.estimator == "grpo_passk":  # the best alone: R_max - R_second, 0 if it is shared
                best = max(rs)
                alone = rs.count(best) == 1
                a = best - max(x for x in rs if x != best) if alone and rewards[i] == best else 0.0
            if scale == "group":
                a = a / (std + cfg.eps)
            elif scale == "batch":
                a = a / (batch_std + cfg.eps)
            elif scale == "leave_one_out":  # the others' std, where it is above 0 (NeMo-RL's)
                others = [rewards[j] for j in idx if j != i]
                loo = statistics.stdev(others) if len(others) > 1 else 0.0
                a = a / (loo + cfg.eps) if loo > 0 and loo >= cfg.min_group_std else a
            adv[i] = a
    if whiten and cfg.estimator in WHITENING:  # (gdpo: one component here)
        # whiten over all trained tokens of the batch (degenerate members count with value 0)
        vals: list[float] = []
        for i, c in enumerate(weights):
            vals += [adv[i]] * c
        if len(vals) > 0:
            # the mean shifted by the first value, as the engine computes it: equal values give
            # mu equal to them exactly, so their whitened advantages are 0, not rounding noise / eps
            c = vals[0]
            mu = c + math.fsum(x - c for x in vals) / len(vals)
            var = math.fsum((x - mu) ** 2 for x in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
            # no spread: every sequence whitens to 0, the untrained ones too (not (a - mu) / eps)
            adv = [(a - mu) / (math.sqrt(var) + cfg.eps) if var > 0 else 0.0 for a in adv]
        else:
            adv = [0.0] * len(adv)
        adv = [0.0 if degenerate_seq[i] else a for i, a in enumerate(adv)]
    share = n_degenerate / len(members) if members else 0.0
    return adv, share


@dataclass
class Reference:
    loss: Tensor  # scalar float64, differentiable w.r.t. logp
    policy_loss: Tensor
    kl_loss: Tensor
    logp: Tensor  # the leaf the loss was built from
    advantages: list[Tensor]  # per sequence, per token (all tokens of the sequence)

    def grad(self) -> Tensor:
        if not self.loss.requires_grad:
            return torch.zeros_like(self.logp)
        (g,) = torch.autograd.grad(self.loss, self.logp, allow_unused=True)
        return torch.zeros_like(self.logp) if g is None else g


def _objective(name: str, obj, r: Tensor, a: Tensor, logp: Tensor) -> Tensor:
    """Per-token policy loss l of SPEC for one sequence's trained tokens."""
    if name in ("sapo", "sapo_seq"):  # (sapo_seq: r is the sequence's ratio)
        tau = torch.where(a > 0, torch.full_like(a, obj.tau_pos), torch.full_like(a, obj.tau_neg))
        p = torch.sigmoid(tau * (r - 1))
        return -(4 / tau) * p * a
    if name == "reinforce":
        return -r * a
    lo, hi = 1 - obj.eps_low, 1 + obj.eps_high
    if name in ("cispo", "cispo_seq"):  # (cispo_seq: r is the sequence's ratio)
        return -torch.clamp(r.detach(), lo, hi) * a * logp
    unclipped = -a * r
    clipped = -a * torch.clamp(r, lo, hi)
    if name == "gppo":
        # clip active where max() picks the clipped term: keep the gradient of the bound
        active = ((a > 0) & (r > hi)) | ((a < 0) & (r < lo))
        bound = torch.where(r > hi, torch.full_like(r, hi), torch.full_like(r, lo))
        # value -bound A (grpo's clipped value), gradient -bound A even where d was clamped
        return torch.where(active, -a * bound * (1 + logp - logp.detach()), unclipped)
    loss = torch.maximum(unclipped, clipped)
    if name in ("grpo", "gspo") and getattr(obj, "dual_clip", None) is not None:
        loss = torch.where(a < 0, torch.minimum(loss, -obj.dual_clip * a), loss)
    return loss


def _dppo(name: str, obj, r: Tensor, a: Tensor, logp: Tensor, old: Tensor) -> Tensor:
    """DPPO's per-token loss as the paper (and verl) write it: -A sg[min(r, C)] logp, dropped
    where the probability moved past the sign's bound (the binary KL in verl's form, 1 - p
    computed as 1 - exp(logp), clamped at 0 for a log-prob within the tolerance above 0)."""
    p, q = torch.exp(logp.detach()), torch.exp(old)
    if name == "dppo_tv":
        drop = torch.where(a > 0, p - q > obj.eps_high, q - p > obj.eps_low)
    else:
        one_q, one_p = (1 - q).clamp(min=0), (1 - p).clamp(min=0)
        kl = q * (old - logp.detach()) + one_q * torch.log((one_q + 1e-8) / (one_p + 1e-8))
        drop = torch.where(a > 0, (kl > obj.eps_high) & (p > q), (kl > obj.eps_low) & (p < q))
    w = r.detach() if obj.ratio_cap is None else torch.clamp(r.detach(), max=obj.ratio_cap)
    return torch.where(drop & (a != 0), torch.zeros_like(w), w) * -a * logp


def splitmix64(seed: int, i: int) -> int:
    """splitmix64's i-th output (0-based) of the stream `seed`, as a signed 64-bit integer."""
    z = (seed + (i + 1) * 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    return z - 2**64 if z >= 2**63 else z


def reference_covariances(logp: Tensor, adv: Tensor, mask: Tensor) -> dict[int, float]:
    """(A - mean A)(logp - mean logp) of every trained token, by index; the means over the
    trained tokens, shifted by the first value (as the engine's: equal values centre to 0)."""
    idx = [i for i in range(logp.numel()) if bool(mask[i])]
    n = len(idx)
    a = [float(adv[i]) for i in idx]
    lp = [float(logp[i]) for i in idx]
    ma = a[0] + math.fsum(x - a[0] for x in a) / n if n else 0.0
    ml = lp[0] + math.fsum(x - lp[0] for x in lp) / n if n else 0.0
    return {i: (a[j] - ma) * (lp[j] - ml) for j, i in enumerate(idx)}


def reference_selection(obj, logp: Tensor, old: Tensor, adv: Tensor, mask: Tensor, clamp: float) -> Tensor:
    """Clip-Cov's or KL-Cov's selected tokens (bool [N]) by plain loops: the covariance
    (A - mean A)(logp - mean logp) over the trained tokens; kl_cov the k largest, clip_cov k of
    those the clip left alone in the window, by the largest splitmix64(seed, index); ties to
    the lower index."""
    cov = reference_covariances(logp, adv, mask)
    idx = list(cov)
    k = max(1, int(obj.fraction * len(idx)))
    if obj.name == "kl_cov":
        order = sorted(idx, key=lambda i: (-cov[i], i))
    else:
        lo, hi = 1 - obj.eps_low, 1 + obj.eps_high

        def clipped(i: int) -> bool:
            r = math.exp(min(max(float(logp[i]) - float(old[i]), -clamp), clamp))
            return (float(adv[i]) > 0 and r > hi) or (float(adv[i]) < 0 and r < lo)

        ok = [i for i in idx if obj.cov_low < cov[i] < obj.cov_high and not clipped(i)]
        order = sorted(ok, key=lambda i: (-splitmix64(obj.seed, i), i))
    sel = torch.zeros(logp.numel(), dtype=torch.bool)
    sel[order[:k]] = True
    return sel


WHITENING = ("reinforce_pp_baseline", "reinforce_pp", "gdpo")


def reference_reward_kl(batch: Batch, config: LossConfig) -> list[list[float]]:
    """reward_kl's estimate k per token of each sequence, by plain loops (0 off the mask as sent)."""
    rk = config.reward_kl
    off = [int(x) for x in batch.offsets]
    old = batch.old_logp if batch.old_logp is not None else batch.logp
    out: list[list[float]] = []
    for i in range(len(off) - 1):
        ks = []
        for t in range(off[i], off[i + 1]):
            x = float(batch.ref_logp[t]) - float(old[t])
            if batch.mask is not None and not bool(batch.mask[t]):
                ks.append(0.0)
            elif rk.estimator == "k1":
                ks.append(-x)
            elif rk.estimator == "k2":
                ks.append(x * x / 2)
            elif rk.estimator == "abs":
                ks.append(abs(x))
            else:  # k3, x clamped from above at log_ratio_clamp
                xc = min(x, config.log_ratio_clamp)
                ks.append(math.expm1(xc) - xc)
            if rk.value_clamp is not None:
                ks[-1] = min(max(ks[-1], -rk.value_clamp), rk.value_clamp)
        out.append(ks)
    return out


def _token_advantages(
    batch: Batch, config: LossConfig, counts: list[int], mask: Tensor | None = None
) -> list[Tensor]:
    """Each sequence's advantages at each of its tokens (float64), given or from the rewards
    (`mask`: the trained tokens, for reward_kl's whitening over tokens)."""
    off = [int(x) for x in batch.offsets]
    b = len(off) - 1
    tok_adv: list[Tensor] = []
    rk = getattr(config, "reward_kl", None)
    gamma = config.advantages.gamma
    otb = config.advantages.estimator == "optimal_token_baseline"
    if (rk is not None or gamma != 1.0 or otb) and batch.advantages is None:
        ks = (
            reference_reward_kl(batch, config)
            if rk is not None
            else [[0.0] * (off[i + 1] - off[i]) for i in range(b)]
        )
        rewards = [float(x) for x in batch.rewards]
        if rk is not None and rk.level == "sequence":
            rewards = [r - rk.beta * math.fsum(k) for r, k in zip(rewards, ks, strict=True)]
        beta = rk.beta if rk is not None and rk.level == "token" else 0.0
        own = rk.beta if rk is not None and rk.level == "immediate" else 0.0  # each token's own KL
        token = (rk is not None and rk.level != "sequence") or gamma != 1.0 or otb
        seq_adv, _ = reference_advantages(
            rewards, [int(g) for g in batch.group_ids], config.advantages, counts, whiten=not token
        )
        vals = []
        for i in range(b):  # OpenRLHF's recurrence G_j = r_j + gamma G_{j+1}, the outcome at T_i
            sent = [
                j for j in range(off[i + 1] - off[i]) if batch.mask is None or bool(batch.mask[off[i] + j])
            ]
            last = sent[-1] if sent else -1
            row, g_ret = [], 0.0
            for j in reversed(range(len(ks[i]))):
                g_ret = -beta * ks[i][j] + (seq_adv[i] if j == last else 0.0) + gamma * g_ret
                # past T_i (untrained): A_i undiscounted, less the KL's return (0 off the mask)
                row.append((g_ret if j <= last else seq_adv[i] + g_ret) - own * ks[i][j])
            vals.append(row[::-1])
        if otb:
            m = mask if mask is not None else torch.ones(off[-1], dtype=torch.bool)
            vals = _reference_token_baseline(batch, config, vals, m)
        if token and config.advantages.estimator in WHITENING:  # over the trained tokens
            m = mask if mask is not None else torch.ones(off[-1], dtype=torch.bool)
            flat = [a for row in vals for a in row]
            tr = [a for a, keep in zip(flat, m.tolist(), strict=True) if keep]
            if tr:
                c = tr[0]
                mu = c + math.fsum(x - c for x in tr) / len(tr)
                var = math.fsum((x - mu) ** 2 for x in tr) / (len(tr) - 1) if len(tr) > 1 else 0.0
            else:
                mu = var = 0.0
            eps = config.advantages.eps
            vals = [[(a - mu) / (math.sqrt(var) + eps) if var > 0 else 0.0 for a in row] for row in vals]
        return [torch.tensor(row, dtype=torch.float64) for row in vals]
    if batch.advantages is not None:
        adv = batch.advantages.to(torch.float64)
        per_token = batch.advantage_level == "token" if batch.advantage_level else (adv.numel() != b)
        for i in range(b):
            L = off[i + 1] - off[i]
            tok_adv.append(adv[off[i] : off[i + 1]] if per_token else adv[i].repeat(L))
    else:
        seq_adv, _ = reference_advantages(
            [float(x) for x in batch.rewards], [int(g) for g in batch.group_ids], config.advantages, counts
        )
        for i in range(b):
            tok_adv.append(torch.full((off[i + 1] - off[i],), seq_adv[i], dtype=torch.float64))
    return tok_adv


def reference_rejection_keep(batch: Batch, config: LossConfig, mask: Tensor) -> Tensor:
    """Rollout rejection (verl's rollout_rs), sequence by sequence: True where every criterion
    keeps the token (its sequence's trained tokens' statistics only)."""
    f64 = torch.float64
    old = (batch.old_logp if batch.old_logp is not None else batch.logp).detach().to(f64)
    rollout = batch.rollout_logp.to(f64)
    off = [int(x) for x in batch.offsets]
    keep = torch.ones(old.numel(), dtype=torch.bool)
    for c in config.rejection:
        for i in range(len(off) - 1):
            sl = slice(off[i], off[i + 1])
            mi = mask[sl]
            o, q = old[sl][mi], rollout[sl][mi]
            d = torch.clamp(o - q, -config.log_ratio_clamp, config.log_ratio_clamp)
            if c.statistic == "k1":
                stat = -d
            elif c.statistic == "k2":
                stat = d * d / 2
            elif c.statistic == "k3":
                stat = torch.exp(d) - 1 - d
            elif c.statistic == "k3_reverse":  # AReaL's kl_k3
                stat = torch.exp(-d) - 1 + d
            else:  # binary_kl
                p, r = torch.exp(o).clamp(1e-6, 1 - 1e-6), torch.exp(q).clamp(1e-6, 1 - 1e-6)
                kl = lambda a, z: a * torch.log(a / z) + (1 - a) * torch.log((1 - a) / (1 - z))  # noqa: E731
                stat = torch.maximum(kl(p, r), kl(r, p))
            if c.level != "token":
                if stat.numel() == 0:
                    continue
                agg = {
                    "seq_sum": stat.sum(),
                    "seq_mean": stat.mean(),
                    "seq_max": stat.max(),
                    "seq_min": stat.min(),
                }[c.level]
                stat = agg.expand(stat.shape)
            if c.statistic == "k1":
                lower = c.lower if c.lower is not None else 1 / c.upper
                lo = math.log(lower) if lower > 0 else -math.inf  # (0: no lower bound)
                bad = (stat < lo) | (stat > math.log(c.upper))
            else:
                bad = stat > c.upper
            idx = torch.arange(off[i], off[i + 1])[mi]
            keep[idx[bad]] = False
    return keep


def _reference_weights(mm: MismatchConfig, o: Tensor, ro: Tensor, o_sent: Tensor, ro_sent: Tensor) -> Tensor:
    """A sequence's mismatch weights v on its trained tokens (`o` old, `ro` rollout) as the spec
    defines them; a sequence-level or geometric weight (repeated on every token) and seq_mask's
    geometric mean are taken over its tokens as sent (`o_sent`, `ro_sent`: rejected ones included, as
    verl's weights are computed apart from rejection)."""
    if mm.level == "token":
        v = torch.exp(o - ro)
    else:  # the product of the sequence's ratios, or (geometric) their geometric mean
        lv = (o_sent - ro_sent).sum() if mm.level == "sequence" else (o_sent - ro_sent).mean()
        v = torch.exp(lv).repeat(len(o))
    if mm.mode == "truncate":
        return torch.clamp(v, min=mm.floor, max=mm.cap)
    if mm.mode == "seq_mask":  # each token's own v; the sequence's geometric mean filters
        geo = float(torch.exp((o_sent - ro_sent).mean())) if len(o_sent) > 0 else 1.0
        return v if mm.lo <= geo <= mm.hi else torch.zeros_like(v)
    return torch.where((v >= mm.lo) & (v <= mm.hi), v, torch.zeros_like(v))


def _reference_norm(batch: Batch, config: LossConfig, trained: Tensor) -> float:
    """verl's rollout_is_batch_normalize: the mean weight over the batch as sent (1: none);
    seq_mask's over `trained`, the tokens rollout rejection left."""
    if config.mismatch is None or not config.mismatch.batch_normalize:
        return 1.0
    off = [int(x) for x in batch.offsets]
    sent = torch.ones(off[-1], dtype=torch.bool) if batch.mask is None else batch.mask.to(torch.bool)
    old = (batch.old_logp if batch.old_logp is not None else batch.logp).detach().to(torch.float64)
    rollout = batch.rollout_logp.to(torch.float64)
    total, count = 0.0, 0
    for i in range(len(off) - 1):
        si = sent[off[i] : off[i + 1]]
        if not bool(si.any()):
            continue
        o_s, ro_s = old[off[i] : off[i + 1]][si], rollout[off[i] : off[i + 1]][si]
        v = _reference_weights(config.mismatch, o_s, ro_s, o_s, ro_s)
        if config.mismatch.mode == "seq_mask":
            v = v[trained[off[i] : off[i + 1]][si]]
        level = config.mismatch.level
        total, count = (
            total + float(v.sum() if level == "token" else v[0]),
            count + (len(v) if level == "token" else 1),
        )
    mean = total / max(count, 1)
    return mean if mean > 1e-8 else 1.0


def _reference_token_baseline(
    batch: Batch, config: LossConfig, returns: list[list[float]], mask: Tensor
) -> list[list[float]]:
    """optimal_token_baseline's advantages from each token's return, by plain loops: W the running
    sum of w = max(1 - 2 pi + sum_pi_squared, 0) (times v^2) over trained tokens, B the group's
    sum of G W over sum of W at each position, 0 in a group of one member and (zero_tail) on the
    lone longest member's tail."""
    adv = config.advantages
    off = [int(x) for x in batch.offsets]
    b = len(off) - 1
    sent = torch.ones(off[-1], dtype=torch.bool) if batch.mask is None else batch.mask.to(torch.bool)
    old = (batch.old_logp if batch.old_logp is not None else batch.logp).detach().to(torch.float64)
    spp = batch.sum_pi_squared.to(torch.float64)
    rollout = None if batch.rollout_logp is None else batch.rollout_logp.to(torch.float64)
    norm = _reference_norm(batch, config, mask)
    trained, weights = [], []  # per sequence: (position, index in the sequence) and W at each
    for i in range(b):
        sl = slice(off[i], off[i + 1])
        idx = [j for j in range(off[i + 1] - off[i]) if bool(mask[off[i] + j])]
        v = [1.0] * len(idx)
        if config.mismatch is not None and idx:
            assert rollout is not None
            si, mi = sent[sl], mask[sl]
            vv = _reference_weights(
                config.mismatch, old[sl][mi], rollout[sl][mi], old[sl][si], rollout[sl][si]
            )
            v = [float(x) / norm for x in vv]
        run, ws = 0.0, []
        for k, j in enumerate(idx):
            w = max(1 - 2 * math.exp(float(old[off[i] + j])) + float(spp[off[i] + j]), 0.0)
            run += w * v[k] ** 2
            ws.append(run)
        trained.append([(k if adv.position == "trained" else j, j) for k, j in enumerate(idx)])
        weights.append(ws)
    groups: dict[int, list[int]] = {}
    for i in range(b):
        if trained[i]:
            groups.setdefault(int(batch.group_ids[i]), []).append(i)
    out = [[0.0] * (off[i + 1] - off[i]) for i in range(b)]
    for members in groups.values():
        sums: dict[int, list[float]] = {}
        for i in members:
            for (p, j), w in zip(trained[i], weights[i], strict=True):
                acc = sums.setdefault(p, [0.0, 0.0])
                acc[0] += returns[i][j] * w
                acc[1] += w
        lengths = sorted(len(trained[i]) for i in members)
        for i in members:
            tail = (
                adv.zero_tail
                and len(members) > 1
                and len(trained[i]) == lengths[-1]
                and lengths[-1] > lengths[-2]
            )
            for p, j in trained[i]:
                base = 0.0
                if len(members) > 1 and not (tail and p >= lengths[-2]):
                    base = sums[p][0] / (sums[p][1] + adv.eps)
                out[i][j] = returns[i][j] - base
    return out


def reference_loss(batch: Batch, config: LossConfig) -> Reference:
    f64 = torch.float64
    logp = batch.logp.detach().to(f64).clone().requires_grad_(True)
    n = logp.numel()
    off = [int(x) for x in batch.offsets]
    b = len(off) - 1
    mask = torch.ones(n, dtype=torch.bool) if batch.mask is None else batch.mask.to(torch.bool)
    old = batch.old_logp.to(f64) if batch.old_logp is not None else None
    ref = batch.ref_logp.to(f64) if batch.ref_logp is not None else None
    rollout = batch.rollout_logp.to(f64) if batch.rollout_logp is not None else None
    C = config.log_ratio_clamp
    name = config.objective.name
    sent = mask
    if config.rejection:  # rollout rejection: its tokens leave the mask first
        mask = mask & reference_rejection_keep(batch, config, mask)
    counts = [int(mask[off[i] : off[i + 1]].sum()) for i in range(b)]

    tok_adv = _token_advantages(batch, config, counts, mask)

    sel = None
    if name in ("clip_cov", "kl_cov"):
        o_all = old if old is not None else logp.detach()
        sel = reference_selection(config.objective, logp.detach(), o_all, torch.cat(tok_adv), mask, C)

    agg = config.aggregation
    n_tok = agg.num_tokens if agg.num_tokens else sum(counts)
    n_seq = agg.num_seqs if agg.num_seqs else sum(1 for c in counts if c > 0)

    def aggregate(per_seq_terms: list[Tensor | None], mode: str = agg.mode) -> Tensor:
        total = torch.zeros((), dtype=f64)
        for i, t in enumerate(per_seq_terms):
            if t is None or counts[i] == 0:
                continue
            if mode == "token_mean":
                total = total + t.sum() / n_tok
            elif mode == "seq_mean_token_mean":
                total = total + t.sum() / counts[i] / n_seq
            elif mode == "seq_mean_token_sum":
                total = total + t.sum() / n_seq
            else:
                total = total + t.sum() / agg.constant
        return total

    norm = _reference_norm(batch, config, mask)

    policy_terms: list[Tensor | None] = []
    kl_terms: list[Tensor | None] = []
    for i in range(b):
        sl = slice(off[i], off[i + 1])
        mi = mask[sl]
        if counts[i] == 0:
            policy_terms.append(None)
            kl_terms.append(None)
            continue
        lp = logp[sl][mi]
        o = old[sl][mi] if old is not None else lp.detach()
        a = tok_adv[i][mi]
        if name in SEQUENCE_RATIO:
            logs = torch.clamp((lp.detach() - o).sum() / counts[i], -C, C)
            r = torch.exp(logs) * torch.exp(lp - lp.detach())
        else:
            r = torch.exp(torch.clamp(lp - o, -C, C))
        if name == "gmpo":
            # each token's clamped log-ratio clipped on the side A's sign picks, then the
            # sequence's geometric mean s; token t carries -A sg[s] exp(c_t - sg[c_t]), as
            # gspo's tokens do (summed over the sequence's tokens, the gradient of -A s)
            c = torch.clamp(lp - o, -C, C)
            obj = config.objective
            if float(a[0]) > 0:
                c = torch.clamp(c, max=obj.eps_high)
            elif float(a[0]) < 0:
                c = torch.clamp(c, min=-obj.eps_low)
            s = torch.exp(c.detach().sum() / counts[i])
            loss_t = -a * s * torch.exp(c - c.detach())
        elif name in ("dppo_tv", "dppo_kl"):
            loss_t = _dppo(name, config.objective, r, a, lp, o)
        elif name == "kl_cov":  # -r A, and coef |logp - old| (unclamped) on the selected tokens
            assert sel is not None
            s = sel[sl][mi]
            pen = config.objective.coef * (lp - o).abs()
            loss_t = -r * a + torch.where(s, pen, torch.zeros_like(pen))
        elif name == "dro":  # Tinker's: -A logp + (coef / 2)(logp - old)^2, unclamped
            loss_t = -a * lp + config.objective.coef / 2 * (lp - o) ** 2
        elif name == "clip_cov":  # grpo's clip, the selected tokens dropped
            assert sel is not None
            clip = _objective("grpo", config.objective, r, a, lp)
            loss_t = torch.where(sel[sl][mi], torch.zeros_like(clip), clip)
        else:
            loss_t = _objective(name, config.objective, r, a, lp)
        mm = config.mismatch
        if mm is not None:
            si = sent[sl]
            o_s = (old if old is not None else logp.detach())[sl][si]
            v = _reference_weights(mm, o, rollout[sl][mi], o_s, rollout[sl][si])
            loss_t = loss_t * (v / norm).detach()
        if config.off_policy_mask_threshold is not None:  # OPSM, as TRL's get_off_policy_mask
            use_rollout = rollout is not None and config.off_policy_mask_reference == "rollout"
            s = (rollout if use_rollout else old if old is not None else logp.detach())[sl][mi]
            if float((s - lp.detach()).mean()) > config.off_policy_mask_threshold:
                loss_t = torch.where(a < 0, torch.zeros_like(loss_t), loss_t)
        policy_terms.append(loss_t)
        if config.kl is not None:
            x = ref[sl][mi] - lp
            est = config.kl.estimator.removesuffix("_st").removesuffix("_seq").removesuffix("_is")
            xc = torch.clamp(x, max=C)  # k3 only, from above: exp(x) finite in float32
            k = -x if est == "k1" else (x * x / 2 if est == "k2" else torch.exp(xc) - xc - 1)
            if est == "abs":  # (autograd's gradient of |x| at 0 is 0)
                k = x.abs()
            cap = config.kl.value_clamp
            weight = "ratio" if config.kl.estimator == "k3_is" else config.kl.weight
            if weight != "none":  # w k with w's gradient w (also past the clamp of its log)
                q = o if weight == "ratio" else (lp.detach() if weight == "score" else rollout[sl][mi])
                w = torch.exp(torch.clamp(lp - q, -C, C)).detach() * torch.exp(lp - lp.detach())
                wk = w * k
                if est == "k3":  # past k3's clamp of x, -x w (k2's gradient weighted), not w k3
                    past = wk.detach() + (lp - lp.detach()) * (-x * w).detach()
                    wk = torch.where(x > C, past, wk)
                k = wk
            if cap is not None:  # verl's torch.clamp(kld, -10, 10): the value and its gradient
                k = torch.clamp(k, -cap, cap)
            if config.kl.estimator.endswith("_st"):  # straight-through: k's value, k2's gradient
                k2 = x * x / 2
                k = k2 - k2.detach() + k.detach()
            if config.kl.estimator == "k3_is_seq" and lp.numel() > 0:
                # s_i k3, s_i = exp(clamp(mean(lp - o))) with the derivative s_i past the clamp
                # too; k3 at x clamped from above with its derivative there (straight through)
                xs = x - (x - xc).detach()
                ls = (lp - o).mean()
                s = torch.exp(torch.clamp(ls.detach(), -C, C)) * torch.exp(ls - ls.detach())
                k = (torch.exp(xs) - xs - 1) * s
            kl_terms.append(k)
        else:
            kl_terms.append(None)
    policy = aggregate(policy_terms)
    if config.kl is not None:
        kl = config.kl.beta * aggregate(kl_terms, config.kl.aggregation or agg.mode)
    else:
        kl = torch.zeros((), dtype=f64)
    return Reference(policy + kl, policy, kl, logp, tok_adv)


# ---------------------------------------------------------------- random batches and configs

# objectives whose ratio is the sequence's (GSPO's s_i), and those that need one advantage per
# sequence (per-token advantages are refused)
SEQUENCE_RATIO = ("gspo", "gspo_token", "sapo_seq", "cispo_seq")
PER_SEQUENCE_ADVANTAGES = ("gspo", "gmpo", "sapo_seq")
OBJECTIVE_NAMES = (
    "sapo",
    "grpo",
    "gspo",
    "gspo_token",
    "cispo",
    "gppo",
    "reinforce",
    "gmpo",
    "dppo_tv",
    "dppo_kl",
    "clip_cov",
    "kl_cov",
    "sapo_seq",
    "cispo_seq",
    "dro",
)
AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "token_sum_norm")
KL_OPTIONS = (None, "k1", "k2", "k3", "k3_is", "k3_is_seq", "k1@score", "k2@ratio", "abs@sampler_ratio")
MISMATCH_OPTIONS = (
    None,
    ("token", "truncate"),
    ("token", "mask"),
    ("sequence", "truncate"),
    ("sequence", "mask"),
    ("token", "seq_mask"),
    ("geometric", "truncate"),
    ("geometric", "mask"),
)


def random_batch(
    seed: int,
    *,
    max_seqs: int = 6,
    max_len: int = 6,
    advantages: str = "rewards",  # "rewards" | "sequence" | "token"
    big_deltas: bool = False,
    dtype: torch.dtype = torch.float64,
    with_mask: bool = True,
    num_seqs: int | None = None,
) -> Batch:
    """A ragged batch: empty sequences, masked garbage (finite, even positive log-probs),
    non-contiguous groups, optional log-ratios beyond the clamp bound."""
    g = torch.Generator().manual_seed(seed)
    b = int(torch.randint(1, max_seqs + 1, (1,), generator=g))
    b = num_seqs if num_seqs is not None else b
    lengths = torch.randint(0, max_len + 1, (b,), generator=g)
    n = int(lengths.sum())
    logp = -torch.rand(n, generator=g, dtype=torch.float64) * 4 - 0.01
    delta = 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    if big_deltas:
        big = torch.rand(n, generator=g) < 0.2
        delta = torch.where(big, 8 * torch.randn(n, generator=g, dtype=torch.float64), delta)
    old = (logp - delta).clamp(max=-1e-3)
    ref = (logp + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    rollout = (old + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)).clamp(max=-1e-3)
    mask = (torch.rand(n, generator=g) < 0.8) if with_mask else torch.ones(n, dtype=torch.bool)
    # finite garbage on masked tokens: must never change a result
    garbage = torch.where(torch.rand(n, generator=g) < 0.5, 7.5, -3.0e4).to(torch.float64)
    logp, old, ref, rollout = (torch.where(mask, x, garbage) for x in (logp, old, ref, rollout))
    rewards = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)[torch.randint(0, 3, (b,), generator=g)]
    if torch.rand(1, generator=g) < 0.3:
        rewards = torch.randn(b, generator=g, dtype=torch.float64)
    groups = torch.randint(0, max(1, b // 2), (b,), generator=g) * 7 - 3  # non-contiguous, negative ids too
    kw: dict = {}
    if advantages == "rewards":
        kw = {"rewards": rewards, "group_ids": groups}
    elif advantages == "sequence":
        kw = {"advantages": torch.randn(b, generator=g, dtype=torch.float64), "advantage_level": "sequence"}
    else:
        kw = {"advantages": torch.randn(n, generator=g, dtype=torch.float64), "advantage_level": "token"}
    return Batch(
        logp=logp.to(dtype),
        offsets=Batch.offsets_from_lengths(lengths),
        old_logp=old.to(dtype),
        mask=mask,
        ref_logp=ref.to(dtype),
        rollout_logp=rollout.to(dtype),
        **kw,
    )


def make_config(
    objective: str,
    agg: str,
    kl: str | None,
    mismatch: tuple[str, str] | None,
    *,
    variant: int = 0,
    estimator: str = "grpo",
    scale: str | None = None,
    clamp: float = 20.0,
    global_norm: bool = False,
    min_group_std: float = 0.0,
    floor: float = 0.0,
    opsm: float | None = None,
    rejection: tuple = (),
) -> LossConfig:
    from softgate.engine import (
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
        MismatchConfig,
        Reinforce,
        Sapo,
        SapoSeq,
    )

    objs = {
        "sapo": [Sapo(), Sapo(tau_pos=0.5, tau_neg=3.0), Sapo(tau_pos=2.0, tau_neg=0.7)],
        "grpo": [Grpo(), Grpo(eps_low=0.2, eps_high=0.28, dual_clip=1.15), Grpo(eps_low=0.1, eps_high=0.3)],
        "gspo": [Gspo(), Gspo(eps_low=0.1, eps_high=0.15, dual_clip=1.2), Gspo(eps_low=0.05, eps_high=0.3)],
        "gspo_token": [
            GspoToken(),
            GspoToken(eps_low=0.1, eps_high=0.15),
            GspoToken(eps_low=0.05, eps_high=0.3),
        ],
        "cispo": [Cispo(), Cispo(eps_low=0.2, eps_high=0.2), Cispo(eps_low=0.5, eps_high=0.1)],
        "gppo": [Gppo(), Gppo(eps_low=0.1, eps_high=0.28), Gppo(eps_low=0.3, eps_high=0.05)],
        "gmpo": [Gmpo(), Gmpo(eps_low=0.1, eps_high=0.2), Gmpo(eps_low=0.3, eps_high=0.05)],
        "dppo_tv": [
            DppoTv(),
            DppoTv(eps_low=0.05, eps_high=0.1, ratio_cap=1.2),
            DppoTv(eps_low=0.2, eps_high=0.02),
        ],
        "dppo_kl": [
            DppoKl(),
            DppoKl(eps_low=0.01, eps_high=0.02, ratio_cap=1.2),
            DppoKl(eps_low=0.1, eps_high=0.005),
        ],
        # (fractions and windows that select several of a small batch's tokens)
        "clip_cov": [
            ClipCov(fraction=0.2, cov_low=-0.5, cov_high=5.0),
            ClipCov(eps_low=0.1, eps_high=0.28, fraction=0.1, cov_low=0.0, cov_high=2.0, seed=7),
            ClipCov(fraction=0.5, cov_low=-10.0, cov_high=10.0, seed=2**52 + 3),  # (JSON: exact in a double)
        ],
        "kl_cov": [KlCov(fraction=0.2), KlCov(fraction=0.05, coef=0.3), KlCov(fraction=1.0, coef=2.0)],
        "reinforce": [Reinforce()],
        "sapo_seq": [SapoSeq(), SapoSeq(tau_pos=0.5, tau_neg=3.0), SapoSeq(tau_pos=2.0, tau_neg=0.7)],
        "cispo_seq": [CispoSeq(), CispoSeq(eps_low=0.2, eps_high=0.2), CispoSeq(eps_low=0.5, eps_high=0.1)],
        "dro": [Dro(), Dro(coef=0.3), Dro(coef=0.0)],
    }[objective]
    obj = objs[variant % len(objs)]
    aggc = AggregationConfig(
        mode=agg,  # type: ignore[arg-type]
        constant=37.0 if agg == "token_sum_norm" else None,
        num_tokens=123.0 if global_norm else None,
        num_seqs=17.0 if global_norm else None,
    )
    klc = None
    if kl:  # an estimator, or "estimator@weight"
        est, _, weight = kl.partition("@")
        klc = KLConfig(estimator=est, beta=0.07, weight=weight or "none")  # type: ignore[arg-type]
    mmc = (
        MismatchConfig(
            level=mismatch[0],  # type: ignore[arg-type]
            mode=mismatch[1],  # type: ignore[arg-type]
            cap=1.3,
            lo=0.8,
            hi=1.25,
            floor=floor,
        )
        if mismatch
        else None
    )
    return LossConfig(
        objective=obj,
        advantages=AdvantageConfig(estimator=estimator, scale=scale, min_group_std=min_group_std),  # type: ignore[arg-type]
        aggregation=aggc,
        kl=klc,
        mismatch=mmc,
        log_ratio_clamp=clamp,
        off_policy_mask_threshold=opsm,
        rejection=rejection,
    )


def near_boundary(batch: Batch, config: LossConfig, tol: float = 1e-7) -> bool:
    """True when some trained token sits (numerically) on a discontinuity of the loss or its
    gradient: clip bounds, dual clip, clamp bounds, mismatch cap / lo / hi; for kl_cov the
    k-th and (k+1)-th covariances tied (two trained tokens always are), for clip_cov a
    covariance on its window's ends."""
    f64 = torch.float64
    off = [int(x) for x in batch.offsets]
    mask = torch.ones(batch.logp.numel(), dtype=torch.bool) if batch.mask is None else batch.mask.bool()
    logp = batch.logp.to(f64)
    old = batch.old_logp.to(f64) if batch.old_logp is not None else logp
    C = config.log_ratio_clamp
    obj = config.objective
    bounds: list[float] = []
    if obj.name in ("clip_cov", "kl_cov"):
        counts = [int(mask[off[i] : off[i + 1]].sum()) for i in range(len(off) - 1)]
        adv = torch.cat([torch.zeros(0, dtype=f64), *_token_advantages(batch, config, counts, mask)])
        covs = sorted(reference_covariances(logp, adv, mask).values(), reverse=True)
        k = max(1, int(obj.fraction * len(covs)))
        near = [(covs[k - 1], covs[k])] if obj.name == "kl_cov" and k < len(covs) else []
        if obj.name == "clip_cov":
            near = [(c, end) for c in covs for end in (obj.cov_low, obj.cov_high)]
        if any(abs(x - y) <= tol * max(1.0, abs(x)) for x, y in near):
            return True
    dppo = obj.name in ("dppo_tv", "dppo_kl")
    if hasattr(obj, "eps_low") and not dppo:
        bounds += [1 - obj.eps_low, 1 + obj.eps_high]
    if getattr(obj, "dual_clip", None):
        bounds.append(obj.dual_clip)
    if getattr(obj, "ratio_cap", None):
        bounds.append(obj.ratio_cap)
    if dppo:  # its bounds are on the divergence (either sign's, for either token: a superset)
        p, q = torch.exp(logp), torch.exp(old)
        div = (
            p - q
            if obj.name == "dppo_tv"
            else q * (old - logp) + (1 - q) * torch.log((1 - q + 1e-8) / (1 - p + 1e-8))
        )
        for bd in (obj.eps_low, obj.eps_high):
            x = div.abs() if obj.name == "dppo_tv" else div
            if bool((((x - bd).abs() < tol) & mask).any()):
                return True
    vals: list[Tensor] = []
    for i in range(len(off) - 1):
        mi = mask[off[i] : off[i + 1]]
        if not bool(mi.any()):
            continue
        d = (logp - old)[off[i] : off[i + 1]][mi]
        if obj.name in SEQUENCE_RATIO:
            ls = d.sum() / mi.sum()
            if abs(abs(float(ls)) - C) < tol:
                return True
            vals.append(torch.exp(ls.clamp(-C, C)).reshape(1))
        else:
            if bool(((d.abs() - C).abs() < tol).any()):
                return True
            vals.append(torch.exp(d.clamp(-C, C)))
        if batch.ref_logp is not None and config.kl is not None:
            x = (batch.ref_logp.to(f64) - logp)[off[i] : off[i + 1]][mi]
            if bool(((x - C).abs() < tol).any()):  # k3's clamp, from above only
                return True
            cap = config.kl.value_clamp
            if cap is not None:  # the value bound's, |k| = cap (k3's value at x = C is far past it)
                est = config.kl.estimator.removesuffix("_st")
                xc = x.clamp(max=C)
                k = (
                    -x
                    if est == "k1"
                    else (x * x / 2 if est == "k2" else (x.abs() if est == "abs" else torch.expm1(xc) - xc))
                )
                if bool(((k.abs() - cap).abs() < tol * max(1.0, cap)).any()):
                    return True
        mm = config.mismatch
        if mm is not None and batch.rollout_logp is not None:
            lv = (old - batch.rollout_logp.to(f64))[off[i] : off[i + 1]][mi]
            if mm.level == "sequence":
                lv = lv.sum().reshape(1)
            elif (mm.level == "geometric" or mm.mode == "seq_mask") and lv.numel() > 0:  # (the mean)
                lv = lv.mean().reshape(1)
            v = torch.exp(lv)
            for bd in [mm.cap, mm.floor] if mm.mode == "truncate" else [mm.lo, mm.hi]:
                if bool(((v - bd).abs() < tol).any()):
                    return True
        delta = config.off_policy_mask_threshold
        if delta is not None and bool(mi.any()):  # OPSM's sequence mean on its threshold
            use_rollout = batch.rollout_logp is not None and config.off_policy_mask_reference == "rollout"
            src = batch.rollout_logp if use_rollout else batch.old_logp
            s = src.to(f64) if src is not None else logp
            if abs(float((s - logp)[off[i] : off[i + 1]][mi].mean()) - delta) < tol:
                return True
    if vals and bounds:
        r = torch.cat(vals)
        for bd in bounds:
            if bool(((r - bd).abs() < tol * max(1.0, bd)).any()):
                return True
    return False


def assert_same_result(a, b, tol: float = 1e-5) -> None:
    """Two LossResults agree: loss, gradient and gate weight within `tol`, the same clip mask,
    every metric within 1e-4 relative."""
    assert a.loss == pytest.approx(b.loss, rel=tol, abs=tol)
    torch.testing.assert_close(a.grad, b.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(a.gate_weight, b.gate_weight, rtol=tol, atol=tol)
    assert torch.equal(a.clip_mask, b.clip_mask)
    for k in METRIC_NAMES:
        assert a.metrics[k] == pytest.approx(b.metrics[k], rel=1e-4, abs=1e-6), k
