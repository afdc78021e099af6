"""chunked_token_terms: the eager `kernel.token_terms` over a large batch, a slice of tokens at a time.

Eager torch runs the kernel as ~60 separate passes over the tokens, each writing an [N]
temporary: at 16M tokens each pass streams 64 MB through memory, and a call holds several of
them at once. Over slices of CHUNK_TOKENS tokens the passes stay in cache and a call holds one
slice's temporaries (16M tokens, SAPO, 2 cores: under glibc 2.1 s -> ~0.5 s, the peak ~1 GB
lower; bench/RESULTS.md, "Engine"). Compiled code fuses the passes into one loop and needs
none of this; eager code runs a configuration's first calls while it compiles in the
background, and every call when compiling is off.

Per-token outputs equal the whole kernel's up to their last bit or two (every per-token term
is elementwise, but ATen computes a pass's last few elements with scalar code, and slicing
moves which elements those are); a sum is the sum of its slices' sums, another rounding of it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from softgate.engine.buckets import BUCKET_SUMS
from softgate.engine.kernel import EXPANDED, Terms, terms_layout, token_keys, token_terms
from softgate.engine.segments import host_shortcuts

# tokens per slice on the host. Each op of a slice is a call into torch that releases the GIL
# and takes it back; while a background compile holds it, each taking waits (16M tokens,
# SAPO, during compiles: whole 0.99 s, 4M-token slices 1.03, 1M 0.94, 256k 1.30). Without
# that, from 128k to 1M the time is flat (0.40-0.57 s; 16k 0.98, where the Python per slice
# starts to count). 1M: 16 slices of a 16M batch, ~60 MB of temporaries at a time. A GPU
# streams its memory fast and pays ~60 launches a slice, so there the kernel runs whole.
CHUNK_TOKENS = 1 << 20


def chunked_token_terms(
    t: dict[str, Tensor],
    prm: dict[str, Tensor],
    kind: str,
    seq_ratio: bool,
    adv_per_token: bool,
    kl: tuple[str, str] | None,
    mismatch: tuple[str, str] | None,
    count_dtype: torch.dtype,
    stride: int = 1,
    codes: bool = False,
    *,
    chunk: int | None = None,
) -> Terms:
    """token_terms(...) with the same arguments and results, computed `chunk` tokens at a time
    (rounded down to a multiple of `stride`, so the sample is the same tokens) when the batch
    has more than twice that many. `chunk` None: CHUNK_TOKENS on the host, whole elsewhere."""
    args = (kind, seq_ratio, adv_per_token, kl, mismatch, count_dtype, stride, codes)
    logp = t["logp"]
    n = logp.numel()
    if chunk is None:
        chunk = CHUNK_TOKENS if host_shortcuts(logp.device) else n
    step = max(chunk // stride, 1) * stride
    if n <= 2 * step:
        return token_terms(t, prm, *args)
    tokens = token_keys(t, adv_per_token)
    grad = t["grad_out"] if "grad_out" in t else torch.empty_like(logp)
    sampled = -(-n // stride)
    # the whole batch's length of each output after the gradient and the advantages (ratio,
    # gate, clip mask, ratio codes, gate codes); 0: not per token (the last slice's is it)
    lengths = (sampled, sampled, n if stride == 1 else 0, *((sampled,) * 2 if codes else (0, 0)))
    outs: list[Tensor] = []
    gathered: list[Tensor] = []  # advantages gathered by sequence id, a slice's at a time
    vals: list[Tensor] = []
    for s in range(0, n, step):
        e = min(s + step, n)
        ts = {k: v[s:e] if k in tokens else v for k, v in t.items()}
        ts["grad_out"] = grad[s:e]
        _, a, *per_token, v = token_terms(ts, prm, *args)
        if not outs:
            outs = [x.new_empty(k) for x, k in zip(per_token, lengths, strict=True)]
        for out, x, k in zip(outs, per_token, lengths, strict=True):
            if k:
                out[s // stride : s // stride + x.numel()] = x
        gathered.append(a)
        vals.append(v)
    outs = [out if k else x for out, x, k in zip(outs, per_token, lengths, strict=True)]
    if adv_per_token:
        a = t["adv"]
    elif "adv" + EXPANDED in t:
        a = t["adv" + EXPANDED]
    else:
        a = torch.cat(gathered)
    values = _combine(vals, terms_layout(t, prm, kind, seq_ratio, adv_per_token, kl, mismatch), codes)
    pad = torch.zeros_like(t["ylen"], dtype=torch.float64)  # (token_terms' B zeros)
    return (grad, a, *outs, torch.cat([values, pad]))  # type: ignore[return-value]


def _combine(vals: list[Tensor], layout: tuple[tuple[str, ...], ...], codes: bool) -> Tensor:
    """The whole batch's values from its slices' (each: `layout`'s token sums, token counts and
    per-sequence terms, the bucket sums when `codes`, B zeros): sums and counts add up, the
    ratio's min and max are the slices' min and max, the per-sequence terms any slice's."""
    sums, counts, seq = layout
    token = len(sums) + len(counts)
    stacked = torch.stack([v[: token + len(seq) + (len(BUCKET_SUMS) if codes else 0)] for v in vals])
    out = stacked.sum(0)
    if "ratio_min" in sums:
        i = sums.index("ratio_min")
        out[i] = stacked[:, i].amin()
    if "ratio_max" in sums:
        i = sums.index("ratio_max")
        out[i] = stacked[:, i].amax()
    out[token : token + len(seq)] = stacked[0, token : token + len(seq)]
    return out
