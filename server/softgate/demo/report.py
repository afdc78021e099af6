"""The demo's outputs: curves as JSON and CSV, a PNG figure and a summary table."""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from softgate.demo.runs import RunSpec
from softgate.demo.train import CURVES, RunResult, TrainConfig


def group_runs(results: list[RunResult]) -> OrderedDict[str, list[RunResult]]:
    out: OrderedDict[str, list[RunResult]] = OrderedDict()
    for r in results:
        out.setdefault(r.spec.key, []).append(r)
    return out


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return float(np.mean(xs)) if xs else math.nan


def _standard_error(xs: list[float]) -> float:
    """Standard error of the mean: the sample standard deviation (ddof 1) over sqrt(n)."""
    return float(np.std(xs, ddof=1) / math.sqrt(len(xs))) if len(xs) > 1 else math.nan


def summarize(results: list[RunResult], last_k: int) -> list[dict[str, Any]]:
    """One row per run (means over seeds): eval reward before / after training (with its
    standard error and each seed's), the rollout reward of the last k steps, and the
    trust-region metrics averaged over the whole run."""
    rows = []
    for key, rs in group_runs(results).items():
        k = max(1, min(last_k, len(rs[0].curves["reward"])))
        after = [r.eval_after["reward"] for r in rs]
        rows.append(
            {
                "run": key,
                "label": rs[0].spec.label,
                "seeds": len(rs),
                "eval_reward_before": _mean([r.eval_before["reward"] for r in rs]),
                "eval_reward_after": _mean(after),
                "eval_reward_after_se": _standard_error(after),
                "eval_reward_after_by_seed": {str(r.seed): round(r.eval_after["reward"], 4) for r in rs},
                "eval_reward_after_min": min(r.eval_after["reward"] for r in rs),
                "eval_reward_after_max": max(r.eval_after["reward"] for r in rs),
                "eval_success_after": _mean([r.eval_after["success"] for r in rs]),
                f"train_reward_last{k}": _mean([float(np.mean(r.curves["reward"][-k:])) for r in rs]),
                "trust_region_mean": _mean([_mean(r.curves["trust_region"]) for r in rs]),
                "grad_retained_mean": _mean([_mean(r.curves["grad_retained"]) for r in rs]),
                "approx_kl_mean": _mean([_mean(r.curves["approx_kl"]) for r in rs]),
                "degenerate_groups_mean": _mean([_mean(r.curves["degenerate_groups"]) for r in rs]),
                "seconds": _mean([r.seconds for r in rs]),
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    last = next(k for k in rows[0] if k.startswith("train_reward_last"))
    head = (
        f"{'run':34} {'eval reward':>17} {'± se':>6} {'hit':>5} {last.replace('train_reward_', 'train '):>11} "
        f"{'sat/clip':>8} {'grad_ret':>8} {'approx_kl':>9} {'degen':>5} {'s/run':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        ev = f"{r['eval_reward_before']:.3f} -> {r['eval_reward_after']:.3f}"
        se = r["eval_reward_after_se"]
        se_text = f"{se:.3f}" if math.isfinite(se) else "-"  # one seed: no standard error
        lines.append(
            f"{r['label']:34} {ev:>17} {se_text:>6} {r['eval_success_after']:5.2f} {r[last]:11.3f} "
            f"{r['trust_region_mean']:8.4f} {r['grad_retained_mean']:8.4f} {r['approx_kl_mean']:9.2e} "
            f"{r['degenerate_groups_mean']:5.2f} {r['seconds']:6.1f}"
        )
    return "\n".join(lines)


def _num(x: float) -> float | None:
    return float(f"{x:.4g}") if math.isfinite(x) else None


def write_json(
    path: Path, cfg: TrainConfig, meta: dict[str, Any], results: list[RunResult], rows: list[dict[str, Any]]
) -> None:
    """Config, summary and every run's curves (one run per line, values to 4 significant digits);
    beside it, `demo-summary.json`: the same without the curves."""
    summary = [{k: _num(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows]
    head = {"config": {k: v for k, v in asdict(cfg).items() if k != "seed"}, **meta, "summary": summary}
    path.with_name("demo-summary.json").write_text(json.dumps(head, indent=1) + "\n")
    runs = [
        {
            "run": r.spec.key,
            "label": r.spec.label,
            "objective": r.spec.objective,
            "params": r.spec.params,
            "seed": r.seed,
            "eval_before": r.eval_before,
            "eval_after": r.eval_after,
            "seconds": round(r.seconds, 2),
            "curves": {k: [_num(x) for x in v] for k, v in r.curves.items()},
        }
        for r in results
    ]
    text = json.dumps(head, indent=1)[:-2]
    text += ',\n "runs": [\n  ' + ",\n  ".join(json.dumps(r) for r in runs) + "\n ]\n}\n"
    path.write_text(text)


def write_csv(path: Path, results: list[RunResult]) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "seed", "step", *CURVES])
        for r in results:
            for step in range(len(r.curves["reward"])):
                w.writerow([r.spec.key, r.seed, step] + [f"{r.curves[k][step]:.4g}" for k in CURVES])


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
    if w <= 1 or len(y) < w:
        return y
    kernel = np.ones(w) / w
    pad = np.concatenate([np.full(w - 1, y[0]), y])
    return np.convolve(pad, kernel, mode="valid")


_STYLE = {
    "sapo": ("tab:blue", "-"),
    "grpo": ("tab:orange", "-"),
    "gspo": ("tab:green", "-"),
    "reinforce": ("tab:gray", "-"),
}
# every other run's, in turn (the default run's SAPO ablation: the first three); no two alike
_ABLATION = [
    ("tab:purple", "--"),
    ("tab:red", ":"),
    ("tab:brown", "-."),
    ("tab:pink", "--"),
    ("tab:gray", ":"),
    ("tab:olive", "--"),
    ("tab:cyan", ":"),
    ("tab:purple", "-."),
    ("tab:red", "--"),
    ("tab:brown", ":"),
    ("tab:pink", "-."),
    ("tab:olive", ":"),
    ("tab:cyan", "-."),
]


def _styles(specs: list[RunSpec]) -> dict[str, tuple[str, str]]:
    """Each run's (colour, line style) by key: an objective's first run its own _STYLE, every
    other run the next of _ABLATION, so no two runs share one up to its length (an audit: each
    objective's second run, and the first of one without a _STYLE, all took _ABLATION[0])."""
    styles: dict[str, tuple[str, str]] = {}
    seen: set[str] = set()
    others = 0  # runs styled from _ABLATION so far
    for spec in specs:
        if spec.objective in _STYLE and spec.objective not in seen:
            styles[spec.key] = _STYLE[spec.objective]
        else:
            styles[spec.key] = _ABLATION[others % len(_ABLATION)]
            others += 1
        seen.add(spec.objective)
    return styles


def write_figure(path: Path, results: list[RunResult], title: str, smooth: int = 5) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("reward", "rollout reward"),
        ("success", "exact hit rate"),
        ("trust_region", "SAPO gate saturation (w < 0.5) / clip fraction"),
        ("grad_retained", "grad_retained"),
        ("approx_kl", "approx KL (old - logp)"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=80)
    axes = axes.ravel()
    groups = group_runs(results)
    styles = _styles([rs[0].spec for rs in groups.values()])
    for ax, (metric, name) in zip(axes, panels, strict=False):
        for key, rs in groups.items():
            ys = np.array([r.curves[metric] for r in rs], dtype=float)
            with warnings.catch_warnings():  # a step where no seed had a learning signal: a gap
                warnings.simplefilter("ignore", RuntimeWarning)
                mean, lo, hi = (_smooth(f(ys, axis=0), smooth) for f in (np.nanmean, np.nanmin, np.nanmax))
            x = np.arange(len(mean))
            color, ls = styles[key]
            ax.plot(x, mean, color=color, ls=ls, lw=1.6, label=rs[0].spec.label)
            if len(rs) > 1:
                ax.fill_between(x, lo, hi, color=color, alpha=0.12, lw=0)
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step (rollout batch)", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    # last panel: evaluation reward before / after, per run
    ax = axes[5]
    labels = [rs[0].spec.label for rs in groups.values()]
    after = [np.mean([r.eval_after["reward"] for r in rs]) for rs in groups.values()]
    before = [np.mean([r.eval_before["reward"] for r in rs]) for rs in groups.values()]
    y = np.arange(len(labels))
    ax.barh(y, after, color=[styles[k][0] for k in groups], alpha=0.8, label="after training")
    ax.scatter(before, y, color="black", marker="|", s=200, label="untrained", zorder=3)
    for key_i, rs in enumerate(groups.values()):
        if len(rs) > 1:
            vals = [r.eval_after["reward"] for r in rs]
            ax.plot([min(vals), max(vals)], [key_i, key_i], color="black", lw=1)
    ax.set_yticks(y, labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.3)
    ax.set_xticks([0, 0.25, 0.5, 0.75, 1.0])
    ax.set_title("eval reward (fixed prompts)", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    handles, labs = axes[0].get_legend_handles_labels()
    fig.legend(handles, labs, loc="lower center", ncol=min(4, len(labs)), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.07, 1, 0.96))
    fig.savefig(path, dpi=80, pil_kwargs={"optimize": True})
    plt.close(fig)
