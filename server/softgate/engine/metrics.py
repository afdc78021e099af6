"""Batch metrics: names and meanings (computed in loss.compute_loss from token_terms' sums).

Every metric is a finite float for every valid batch. Where a quantity is undefined (no
trained token, no token of one advantage sign, no rewards) it takes the neutral value named
in its description: 0 for shares, counts, means of signed quantities and spreads, 1 for the
ratio statistics, gate means and `grad_retained` ("nothing suppressed").

"Token" below always means a trained token (loss mask 1). "A>0 tokens" are trained tokens
with a positive advantage A_{i,t}, "A<0 tokens" those with a negative one; tokens with
A = 0 belong to neither sign.
"""

from __future__ import annotations

import math

METRIC_NAMES: dict[str, str] = {
    # loss
    "loss": "scalar loss, policy_loss + kl_loss",
    "policy_loss": "policy part of the loss (after mismatch weights and aggregation)",
    "kl_loss": "KL part of the loss, beta * aggregated KL estimator (0 without a KL term)",
    # sizes
    "num_tokens": "trained tokens in the batch (sum of the loss mask)",
    "num_seqs": "sequences in the batch, empty ones included",
    "num_groups": "distinct group ids (ComputeLoss: 0 when the caller gave advantages)",
    "tokens_pos": "trained tokens with advantage > 0",
    "tokens_neg": "trained tokens with advantage < 0",
    "tokens_zero": "trained tokens with advantage exactly 0",
    # ratio
    "ratio_mean": "mean importance ratio r over tokens (sequence ratio s_i for gspo, gspo_token, sapo_seq, "
    "cispo_seq); 1 if none",
    "ratio_min": "smallest ratio over tokens; 1 if none",
    "ratio_max": "largest ratio over tokens; 1 if none",
    "approx_kl": "mean of (old - logp) over tokens, unclamped; 0 if none",
    "clamped_tokens": "tokens whose policy log-ratio (per-token or sequence) hit the log_ratio_clamp bound",
    # trust region
    "clip_low": "share of A<0 tokens with ratio < 1-eps_low (gmpo: exp(-eps_low); dppo: dropped, the probability "
    "fallen with p_old - p or the binary KL past eps_low; clip_cov: and its drawn tokens; kl_cov: its penalised "
    "tokens); 0 if none or the objective has no clip (sapo, sapo_seq, reinforce, dro)",
    "clip_high": "share of A>0 tokens with ratio > 1+eps_high (gmpo: exp(eps_high); dppo: dropped, the probability "
    "risen with p - p_old or the binary KL past eps_high; clip_cov: and its drawn tokens; kl_cov: its penalised "
    "tokens); 0 if none or the objective has no clip (sapo, sapo_seq, reinforce, dro)",
    "dual_clip": "share of A<0 tokens with ratio > c (grpo or gspo dual clip); 0 if none or no dual clip",
    "clip_fraction": "share of tokens whose trust-region clip is active (clip_mask; clip_cov: and its drawn "
    "tokens with A != 0; kl_cov: every token it penalises, A = 0 too); 0 if none",
    "gate_mean_pos": "mean gate weight over A>0 tokens (SAPO 4p(1-p); hard clips 0/1); 1 if none",
    "gate_mean_neg": "mean gate weight over A<0 tokens; 1 if none",
    "gate_saturation_pos": "share of A>0 tokens whose gate weight < saturation_threshold; 0 if none",
    "gate_saturation_neg": "share of A<0 tokens whose gate weight < saturation_threshold; 0 if none",
    "grad_retained": "sum|c_policy| / sum|c_policy with nothing clipped and w=1| (kl_cov, dro: their penalty's "
    "gradient in the numerator only, so it may pass 1); 1 if the denominator is 0",
    # advantages and rewards
    "adv_mean": "mean advantage over tokens (ComputeAdvantages: over sequences); 0 if none",
    "adv_std": "population std of the advantage over tokens (ComputeAdvantages: over sequences); 0 if none",
    "degenerate_group_frac": "share of groups with no learning signal (singleton, all-equal rewards or std < min_group_std; "
    "reinforce_pp, which reads no groups, counts them too, and optimal_token_baseline (not in "
    "ComputeAdvantages), under which a singleton keeps its return; gdpo: groups so in every reward "
    "component); "
    "0 without groups",
    "reward_mean": "mean reward over sequences (of several components: their weighted sum; skip_nan_components: "
    "over the sequences with one); 0 without rewards",
    "reward_std": "population std of rewards over sequences (of several components: their weighted sum; "
    "skip_nan_components: over the sequences with one); 0 without rewards",
    "unscored_seqs": "sequences with no reward that applies (skip_nan_components: a NaN reward, or every "
    "component NaN): advantage 0 and, when the advantages come from the rewards, left out of the group and "
    "batch statistics that compute them and of reward_mean and reward_std (adv_mean and adv_std count their 0); "
    "left out of reward_mean and reward_std beside the caller's advantages; 0 without the setting",
    # KL and mismatch
    "kl_mean": "mean of the KL estimate (before beta; weighted by kl.weight: w k) over tokens; 0 without a KL term",
    "kl_clamped_tokens": "tokens whose k3 (also k3_st, k3_is, k3_is_seq, weighted k3) KL log-ratio ref - logp was above "
    "log_ratio_clamp, or whose |k| (weighted: |w k|) was above kl.value_clamp (without it k1, k2, k1_st, abs, abs_st: 0)",
    "mismatch_weight_mean": "mean train/inference mismatch weight v over tokens (before batch_normalize); 1 without correction",
    "mismatch_clipped_frac": "share of tokens whose v was clamped to [floor, cap] or zeroed outside [lo, hi] "
    "(seq_mask: the tokens of the sequences it dropped); 0 without correction",
    "mismatch_norm_factor": "the mean of v over the batch as sent that mismatch.batch_normalize divided the weights "
    "by (verl's rollout_is_batch_norm_factor; mismatch_weight_mean is before it; seq_mask's over the tokens "
    "rejection left); 1 without it, or when that mean is at most 1e-8 (nothing divided)",
    "off_policy_masked_frac": "share of tokens whose policy term off-policy sequence masking dropped (A < 0, "
    "their sequence's mean sampler - current log-prob above off_policy_mask_threshold); 0 without it",
    "rejected_tokens": "tokens of the loss mask as given that rollout rejection took out of it (`rejection`); "
    "0 without it. num_tokens and every other metric but the rollout_* ones count the tokens left",
    "rejected_seqs": "sequences of which rollout rejection took out at least one trained token (a whole-sequence "
    "criterion, verl's veto: all of them); verl's rollout_rs_seq_masked_fraction times the batch's sequences. "
    "0 without it",
    "rollout_tokens": "trained tokens of the mask as sent (rejected ones included) the rollout_* metrics are over; "
    "0 without rollout_logp",
    "rollout_kl": "mean of rollout_logp - old_logp (logp on-policy) over rollout_tokens: KL(sampler || trainer), "
    "verl's rollout_corr/kl; may be negative; 0 without rollout_logp",
    "rollout_k3_kl": "mean of exp(d) - 1 - d, d = old_logp - rollout_logp clamped at log_ratio_clamp, over "
    "rollout_tokens: the k3 estimate of KL(sampler || trainer), >= 0, verl's k3_kl; 0 without rollout_logp",
    "reward_kl_mean": "mean over sequences of each one's mean reward_kl estimate (before beta) over its tokens as "
    "sent, 0 for one without any: verl's actor/reward_kl_penalty, what an adaptive KL controller reads; 0 without "
    "reward_kl",
    # verl's gradient-variance proxy (variance_proxy.py), from sum_pi_squared
    "variance_proxy_tokens": "trained tokens whose score energy w = 1 - 2 exp(old_logp) + sum_pi_squared the "
    "variance_proxy_* metrics read (num_tokens); 0 without sum_pi_squared",
    "variance_proxy_w": "mean over sequences (empty ones too) of W_i = sum over its trained tokens of w v^2, v the "
    "mismatch weight applied (1 without a correction): verl's variance_proxy/expected_w; 0 without sum_pi_squared",
    "variance_proxy_a_squared": "mean over sequences of the square of each one's mean advantage over its trained "
    "tokens (0 for one without any): verl's variance_proxy/expected_a_squared; 0 without sum_pi_squared",
    "variance_proxy_total_power": "mean over sequences of rho_i^2 A_i^2 max(W'_i, 0), A_i its mean advantage, rho_i "
    "its mean v, W'_i its W without the v^2 (a token of v = 0 counts 0): verl's variance_proxy/proxy2_total_power, "
    "E||g_i||^2 of the per-sequence gradient; (total_power - ||g||^2) / (B - 1) is verl's proxy3_pure_noise; 0 "
    "without sum_pi_squared. The variance_proxy_* past float64's range read as its largest value",
}


# compute_loss refuses a batch whose loss is not finite (`overflow`): one reaching to_floats is a bug
LOSS_NAMES = ("loss", "policy_loss", "kl_loss")


def to_floats(metrics: dict[str, float]) -> dict[str, float]:
    """Metric values as Python floats, in the order given; a non-finite value (never expected)
    becomes 0, except in LOSS_NAMES: AssertionError there (an INTERNAL error, never a 0 loss)."""
    out = {k: float(x) for k, x in metrics.items()}
    for k in LOSS_NAMES:
        if k in out and not math.isfinite(out[k]):
            raise AssertionError(f"{k} is {out[k]}: compute_loss should have refused the batch (overflow)")
    return {k: v if math.isfinite(v) else 0.0 for k, v in out.items()}
