"""Array plumbing with no per-element Python: numpy / torch in, little-endian bytes out,
padded [B, T] + mask <-> ragged flat + offsets.

torch is never imported here: a torch tensor is recognised by its type's module and turned
into a numpy array through `.detach().cpu().numpy()`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_INT64_MAX = np.uint64(np.iinfo(np.int64).max)


# fraction bits of the floats narrower than float32 (half an ulp at |logp| in [8, 16): 2^(2 - bits))
_FRACTION_BITS = {
    "bfloat16": 7,
    "float16": 10,
    "float8_e4m3fn": 3,
    "float8_e4m3fnuz": 3,
    "float8_e5m2": 2,
    "float8_e5m2fnuz": 2,
}


def is_half(a: np.ndarray) -> bool:
    """A float narrower than float32: numpy's float16, or the bfloat16 / float8 / float6 /
    float4 types JAX's arrays carry (ml_dtypes; numpy sees them as kind "V", not "f")."""
    dt = a.dtype
    return dt.name in _FRACTION_BITS or (
        dt.kind == "V" and dt.itemsize < 4 and dt.name.startswith(("float", "bfloat"))
    )


def half_reason(name: str, dtype: str) -> str:
    """The refusal of a float16 / bfloat16 / float8 input: names the field and what to send instead."""
    if name in ("offsets", "lengths"):  # (e.g. a half mask's row sums, already rounded past 256 / 2048)
        return (
            f"half_precision: {name} is {dtype}, whose whole numbers are not exact past 256 (bfloat16) "
            f"or 2048 (float16); send {name} as integers (e.g. `mask.sum(-1, dtype=torch.int64)`)"
        )
    if name in ("group_ids", "token_counts"):  # (float32, as the advice below said, is refused too)
        return (
            f"half_precision: {name} is {dtype}, whose whole numbers are not exact past 256 (bfloat16) "
            f"or 2048 (float16); send {name} as integers (e.g. `.long()`, before any cast to {dtype})"
        )
    send = f"half_precision: {name} is {dtype}; send {name} as float32 or float64"
    if name == "sum_pi_squared":  # (`.float()` keeps the rounding: 50x the advantages' error; a review)
        return (
            f"{send}: compute it in float32 from the old logits (`softgate_client.torch.sum_pi_squared(logits, "
            "temperature)`, which is `(torch.softmax(logits.float() / temperature, -1) ** 2).sum(-1)` by chunks); "
            "`.float()` on it keeps its rounding"
        )
    if not name.endswith("logp"):
        return f"{send} (e.g. `.float()`)"
    # `.float()` on half log-probs passes this check and keeps their rounding: the advice is
    # where float32 log-probs come from (on-policy GSPO clipped every token; an audit)
    src = "compute the log-probs in float32 from the logits (`logits.float().log_softmax(-1)`)"
    if name in ("old_logp", "rollout_logp"):
        src += ", or ask the sampler for float32 logprobs"
    why = f"`.float()` on {dtype} log-probs keeps their rounding"
    bits = _FRACTION_BITS.get(dtype)
    if bits is not None:  # (each dtype's own figure: fp16 had bf16's; an audit)
        noise = math.expm1(2.0 ** (2 - bits))
        why += (
            f" ({dtype} log-probs carry up to {noise:.1%} ratio noise per token at logp = -10, "
            "more than GSPO's clip band)"
        )
    return f"{send}: {src}; {why}"


class ArrayInputError(ValueError):
    """A client-side input problem, found before anything is sent: (field, reason) pairs."""

    def __init__(self, field: str, reason: str, index: int | None = None):
        self.field = field
        self.reason = reason
        self.index = index
        where = field if index is None else f"{field}[{index}]"
        super().__init__(f"{where}: {reason}")


def is_torch(x: Any) -> bool:
    """True for a torch.Tensor, without importing torch."""
    t = type(x)
    return t.__module__.startswith("torch") and hasattr(x, "detach")


def _is_dtensor(t: Any) -> bool:
    """True for a torch.distributed DTensor, without importing torch.distributed."""
    cls = type(t)
    return "distributed.tensor" in cls.__module__ or (
        hasattr(t, "full_tensor") and (cls.__module__, cls.__name__) != ("torch", "Tensor")
    )


def to_numpy(x: Any, name: str) -> np.ndarray:
    """A numpy view (or, for a device tensor, a host copy) of a numpy array, torch tensor or list."""
    if isinstance(x, np.ndarray):
        # a masked array's mask would be dropped (and its .data is no buffer; an audit)
        if type(x) is not np.ndarray and isinstance(x, np.ma.MaskedArray):
            raise ArrayInputError(
                name,
                "bad_type: a numpy masked array; pass plain values (`x.filled(0)`) and the mask as `mask=`",
            )
        # a subclass as a plain ndarray: np.matrix indexes to 2-d (a [1, K] "ragged" row); a
        # memmap stays a zero-copy view
        a = x if type(x) is np.ndarray else np.asarray(x)
    elif is_torch(x):
        t = x.detach()
        if t.is_nested:  # (strided: torch's "Internal error"; jagged: has no `.to_dense()`)
            raise ArrayInputError(
                name,
                "bad_type: a nested tensor; pass nt.values() with offsets=nt.offsets() (jagged), "
                "or torch.cat(nt.unbind()) with lengths=",
            )
        if _is_dtensor(t):  # (torch's ".numpy() is not supported for tensor subclasses")
            raise ArrayInputError(name, "bad_type: a DTensor; pass x.full_tensor() (differentiable)")
        if str(t.layout) != "torch.strided":  # (torch's own TypeError otherwise)
            raise ArrayInputError(name, f"bad_type: a {t.layout} tensor; pass a dense one (`.to_dense()`)")
        if t.is_quantized:
            raise ArrayInputError(name, f"bad_dtype: {t.dtype}; pass x.dequantize()")
        if t.dtype.is_floating_point and t.element_size() < 4:  # bf16 / fp16 / float8
            raise ArrayInputError(name, half_reason(name, str(t.dtype).replace("torch.", "")))
        if t.device.type == "meta":  # (shapes only: torch's own NotImplementedError otherwise)
            raise ArrayInputError(name, "bad_device: a meta tensor has no data to send")
        if t.device.type != "cpu":
            t = t.cpu()
        try:
            return t.numpy()
        except (TypeError, RuntimeError) as e:  # a dtype numpy lacks (complex32, ...), a subclass
            raise ArrayInputError(name, f"bad_dtype: {t.dtype} ({e})") from None
    else:
        try:
            a = np.asarray(x)
        except (ValueError, TypeError) as e:  # e.g. nested lists of unequal lengths
            raise ArrayInputError(name, f"bad_shape: not an array ({e})") from None
        except RuntimeError as e:  # a list of torch tensors that require grad (or live on a device)
            raise ArrayInputError(
                name,
                f"bad_type: a sequence numpy cannot read ({e}); pass one tensor (`torch.stack(...).detach()`)",
            ) from None
    return a if a.dtype.isnative else a.astype(a.dtype.newbyteorder("="))  # big-endian: native


def int_array(x: Any, name: str) -> np.ndarray:
    """An int64 array of integers; floats are accepted when every value is a whole number."""
    a = to_numpy(x, name)
    if a.dtype.kind in "biu":
        if (
            a.dtype.kind == "u"
            and a.itemsize == 8
            and a.size
            and np.maximum.reduce(a, axis=None) > _INT64_MAX
        ):
            k = int(np.argmax(a.reshape(-1) > _INT64_MAX))  # (it wrapped to a negative int64; an audit)
            raise ArrayInputError(name, f"out_of_range: {a.reshape(-1)[k]} does not fit in int64", k)
        return a.astype(np.int64, copy=False)
    if is_half(a):  # (as a torch half tensor is, in to_numpy)
        raise ArrayInputError(name, half_reason(name, a.dtype.name))
    if a.dtype.kind != "f":
        raise ArrayInputError(name, f"bad_dtype: {a.dtype}; expected integers")
    with np.errstate(invalid="ignore"):  # nan / inf: refused below
        i = a.astype(np.int64)
    bad = np.flatnonzero(i != a)
    if bad.size:
        x = a.reshape(-1)[bad[0]]
        if np.isfinite(x) and x == np.floor(x):  # a whole number past int64 (it wrapped)
            raise ArrayInputError(name, f"out_of_range: {x} does not fit in int64", int(bad[0]))
        raise ArrayInputError(name, f"not_integer: {x}", int(bad[0]))
    return i


def float_array(x: Any, name: str, dtype: np.dtype | None = None) -> np.ndarray:
    """A float32/float64 array; integers and bools are widened to float64, exact to 2^53 (logp's
    to float32, the batch's dtype it sets; or to `dtype`). The other inputs are cast to the
    batch's dtype after: through float32 they lost digits past 2^24 in a float64 batch."""
    a = to_numpy(x, name)
    if is_half(a):
        raise ArrayInputError(name, half_reason(name, a.dtype.name))
    if dtype is not None:
        return a.astype(dtype, copy=False)
    if a.dtype not in FLOAT_DTYPES:
        if a.dtype.kind in "biu":
            return a.astype(np.float32 if name == "logp" else np.float64)
        raise ArrayInputError(name, f"bad_dtype: {a.dtype}; expected float32 or float64")
    return a


def le_bytes(a: np.ndarray) -> bytes:
    """The array's elements as contiguous little-endian bytes (one memcpy for native LE arrays)."""
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and np.little_endian is False):
        a = a.astype(a.dtype.newbyteorder("<"))
    return np.ascontiguousarray(a).tobytes()


def from_le_bytes(data: bytes, dtype: np.dtype | str) -> np.ndarray:
    """A (read-only, zero-copy) numpy view of little-endian bytes."""
    dt = np.dtype(dtype).newbyteorder("<")
    if len(data) % dt.itemsize:
        raise ValueError(f"{len(data)} bytes is not a whole number of {dt} elements")
    out = np.frombuffer(data, dtype=dt)
    return out if np.little_endian else out.astype(dt.newbyteorder("="))


@dataclass
class Layout:
    """How a request's token arrays map between the caller's shape and the wire's ragged form.

    `padded` is None for ragged input; else (B, T) and `valid` is the [B, T] bool array of the
    tokens that travel (each row's prefix up to its last mask = 1). `offsets` is int64 [B + 1].
    """

    offsets: np.ndarray
    padded: tuple[int, int] | None = None
    valid: np.ndarray | None = None
    # the loss mask to send (None: every sent token is trained on)
    mask: np.ndarray | None = None

    @property
    def num_seqs(self) -> int:
        return int(self.offsets.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def flatten(self, x: Any, name: str, *, per_token_float: bool = True) -> np.ndarray:
        """A per-token input in the wire's ragged form (padded inputs gather the valid tokens)."""
        a = float_array(x, name) if per_token_float else to_numpy(x, name)
        if self.padded is None:
            if a.ndim != 1 or a.shape[0] != self.num_tokens:
                raise ArrayInputError(name, f"bad_shape: {tuple(a.shape)}; expected ({self.num_tokens},)")
            return a
        if tuple(a.shape) != self.padded:
            raise ArrayInputError(name, f"bad_shape: {tuple(a.shape)}; expected {self.padded} like logp")
        if self.valid is None:  # every position travels
            return a.reshape(-1)
        return a[self.valid]

    def unflatten(self, flat: np.ndarray, fill: Any = 0) -> np.ndarray:
        """A per-token output in the caller's shape (padded: zeros / `fill` outside the valid tokens)."""
        if self.padded is None:
            return flat
        if self.valid is None:
            return flat.reshape(self.padded)
        out = np.full(self.padded, fill, dtype=flat.dtype)
        out[self.valid] = flat
        return out


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.add.accumulate(lengths, out=out[1:])  # np.cumsum, without its Python-level dispatch
    return out


def make_layout(
    logp: np.ndarray,
    *,
    mask: Any = None,
    offsets: Any = None,
    lengths: Any = None,
) -> Layout:
    """Choose the wire layout from logp's shape and the given mask / offsets / lengths.

    - 1-D logp (ragged): `offsets` [B + 1] or `lengths` [B] are required; `mask` is sent as is.
    - 2-D logp [B, T] (padded): `mask` [B, T] (optional, default all ones) marks the trained
      tokens; each row travels up to its last mask = 1 (trailing padding is dropped), or up to
      `lengths`, where each row ends (not a count of trained tokens: a mask = 1 past it is
      refused). Interior zeros travel as the loss mask.
    """
    if logp.ndim == 1:
        if offsets is not None and lengths is not None:  # (lengths were silently ignored; an audit)
            raise ArrayInputError("lengths", "unexpected: ragged logp takes offsets or lengths, not both")
        if offsets is not None:
            off = _checked_offsets(int_array(offsets, "offsets"))
        elif lengths is not None:
            ln = int_array(lengths, "lengths")
            if ln.ndim != 1:
                raise ArrayInputError("lengths", f"bad_shape: {tuple(ln.shape)}; expected (B,)")
            if ln.size and np.minimum.reduce(ln) < 0:  # (ln.min() goes through Python-level wrappers)
                raise ArrayInputError("lengths", "negative", int(np.argmin(ln)))
            off = offsets_from_lengths(ln)
            if off[-1] != logp.shape[0] or np.logical_or.reduce(off[1:] < off[:-1]):  # (a wrapped
                # int64 sum can land on N: lengths >= 0, so a wrap shows as a decrease)
                total = sum(int(x) for x in ln)
                raise ArrayInputError(
                    "lengths", f"bad_sum: they sum to {total}; logp has {logp.shape[0]} tokens"
                )
        else:
            raise ArrayInputError("offsets", "missing: ragged (1-D) logp needs offsets or lengths")
        if off[-1] != logp.shape[0]:  # (named as the engine names it, not as logp's shape)
            raise ArrayInputError(
                "offsets",
                f"bad_offsets: offsets[-1] = {int(off[-1])}, must equal the number of tokens {logp.shape[0]}",
                off.shape[0] - 1,
            )
        m = None
        if mask is not None:
            m = _bool_mask(mask)
            if m.shape != logp.shape:
                raise ArrayInputError("mask", f"bad_shape: {tuple(m.shape)}; expected {tuple(logp.shape)}")
        return Layout(offsets=off, mask=m)

    if logp.ndim != 2:
        raise ArrayInputError(
            "logp", f"bad_shape: {tuple(logp.shape)}; expected (N,) ragged or (B, T) padded"
        )
    b, t = logp.shape
    if offsets is not None:
        raise ArrayInputError("offsets", "unexpected: padded (2-D) logp takes mask or lengths, not offsets")
    m = None
    if mask is not None:
        m = _bool_mask(mask)
        if m.shape != (b, t):
            raise ArrayInputError("mask", f"bad_shape: {tuple(m.shape)}; expected {(b, t)}")
    if lengths is not None:
        ln = int_array(lengths, "lengths")
        if ln.shape != (b,):
            raise ArrayInputError("lengths", f"bad_shape: {tuple(ln.shape)}; expected ({b},)")
        if b and (np.minimum.reduce(ln) < 0 or np.maximum.reduce(ln) > t):
            raise ArrayInputError("lengths", f"out_of_range: lengths must lie in [0, {t}]")
        if m is not None:  # (`lengths=mask.sum(-1)` cut rows with a tool-output gap short; an audit)
            cut = m & (np.arange(t, dtype=np.int64)[None, :] >= ln[:, None])
            if cut.any():
                i, j = (int(k) for k in np.argwhere(cut)[0])
                raise ArrayInputError(
                    "lengths",
                    f"cuts_trained_tokens: row {i} has mask = 1 at column {j} >= lengths[{i}] = {int(ln[i])} "
                    "(lengths is where a row ends, not how many tokens are trained)",
                )
    elif m is not None:
        # each row up to its last trained token (T = 0: no token, and nothing for argmax)
        last = t - np.argmax(m[:, ::-1], axis=1) if t else 0
        ln = np.where(m.any(axis=1), last, 0).astype(np.int64)
    else:
        ln = None  # type: ignore[assignment]
    if ln is None or (b and np.minimum.reduce(ln) == t):
        valid = None  # every position travels: no gather
        off = np.arange(b + 1, dtype=np.int64) * t
    else:
        valid = np.arange(t, dtype=np.int64)[None, :] < ln[:, None]
        off = offsets_from_lengths(ln)
    layout = Layout(offsets=off, padded=(b, t), valid=valid)
    if m is not None:
        flat_m = m.reshape(-1) if valid is None else m[valid]
        if not flat_m.all():
            layout.mask = flat_m  # interior (or, with lengths, any) zeros travel as the loss mask
    return layout


def _checked_offsets(off: np.ndarray) -> np.ndarray:
    """The caller's offsets, refused as the engine refuses them (its reasons, its order) before
    anything uses them: they picked the advantages' level and cut the stream's chunks (an audit)."""
    if off.ndim != 1 or off.shape[0] < 1:
        raise ArrayInputError("offsets", f"bad_shape: {tuple(off.shape)}; expected (B + 1,)")
    if off[0] != 0:
        raise ArrayInputError("offsets", f"bad_offsets: offsets[0] = {int(off[0])}, must be 0", 0)
    down = off[1:] < off[:-1]
    if np.logical_or.reduce(down):  # (.any() goes through Python-level wrappers)
        raise ArrayInputError(
            "offsets", "bad_offsets: offsets must be non-decreasing", int(np.argmax(down)) + 1
        )
    return off


def _bool_mask(mask: Any) -> np.ndarray:
    """The mask as bool, from any numeric dtype (torch half masks included). A value other than
    0 and 1 (NaN, 0.5, 2, -1) is refused, as the engine refuses it: a soft weight read as
    "trained" gave a silently wrong gradient (an audit)."""
    if is_torch(mask) and mask.dtype.is_floating_point:
        t = mask.detach()
        if (t.device.type == "cpu" and t.element_size() > 2) or str(t.layout) != "torch.strided":
            mask = t  # a host float32/64 mask: read below, as the numpy view it is
        else:  # a half one (numpy has no bfloat16), or one on a device (its bools are what is copied)
            trained = t != 0  # (a meta tensor is refused by to_numpy)
            if t.numel() and t.device.type != "meta" and bool((trained & (t != 1)).any()):
                _refuse_values(to_numpy(t.float(), "mask"))
            mask = trained
    m = to_numpy(mask, "mask")
    if m.dtype == np.bool_:
        return m
    if is_half(m):  # (JAX's bfloat16 0 / 1: exact in float32)
        m = m.astype(np.float32)
    if m.dtype.kind not in "biuf":
        raise ArrayInputError("mask", f"bad_dtype: {m.dtype}; expected bool or numbers 0 and 1")
    trained = m != 0
    if np.logical_or.reduce(trained & (m != 1), axis=None):  # (NaN is neither)
        _refuse_values(m)
    return trained


def _refuse_values(m: np.ndarray) -> NoReturn:
    """Refuse a mask holding a value other than 0 and 1, naming the first."""
    bad = ((m != 0) & (m != 1)).reshape(-1)
    i = int(np.argmax(bad))
    why = f"bad_mask: {m.reshape(-1)[i].item()!r}; a mask value is 0 (not trained) or 1 (trained)"
    if m.ndim != 2:
        raise ArrayInputError("mask", why, i)
    t = m.shape[1]
    raise ArrayInputError("mask", f"{why} (row {i // t}, column {i % t} of the padded input)")
