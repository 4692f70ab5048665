"""Residual-based reweighting with repeated-median regression (IRLS).

Fu, Xie, Li, Chen, "Attack-Resistant Federated Learning with Residual-based Reweighting", 2019,
https://arxiv.org/abs/1912.11464. A baseline of the paper (arXiv 2406.10630; ``--fed_alg residual``
with ``LAMBDA = 2.0``, ``thresh = 0.05``, shards of 2000 coordinates).

Rule, for every coordinate (``n`` client values ``y``, ranks ``x = 0..n-1`` of those values):

1. Repeated-median line (Siegel): slope ``= med_i med_{j != i} (y_(i) - y_(j)) / (i - j)`` over the
   sorted values, intercept ``= med(y) - slope (n - 1) / 2``; ``line_i = intercept + slope x_i``.
2. Residuals ``r_i = y_i - line_i``, robust scale ``tau = 1.4826 (1 + 5/(n-1)) M + eps`` where
   ``M`` is the median of the ``n - 1`` largest ``|r_i|``; standardised ``e_i = r_i / tau``.
3. Leverage ``h_i = 1/n + (x_i - (n-1)/2)^2 / (n (n^2 - 1) / 12)`` (the hat matrix of ``[1, x]``);
   Huber weight ``w_i = min(1, K sqrt(1 - h_i) / |e_i|)`` with ``K = lam sqrt(2/n)``.
4. Values with ``w_i < threshold`` are replaced by ``line_i`` (clipped to the fitted line).
5. Confidence: ``s_i += w_i * std_j(w_j)`` summed over coordinates (coordinates where the weights
   disagree count more).

Finally the client weights are ``c_i ∝ p_i (s_i / max_j s_j)^2`` (``p`` = client sizes, uniform in
the paper) and the aggregate is ``sum_i c_i y'_i`` over the clipped values ``y'``. If no coordinate
separates the clients at all (every ``s_i = 0``, e.g. identical updates, or any ``n = 3`` round,
where the Huber weights are always 1), the ratio ``s_i / max s`` is 0/0; the rule then trusts
everyone equally (``c = p``), reports ``info["no_separation"] = True`` and says so in
``info["fallback"]``. The paper's code would produce NaN there.

Coordinates are independent, so ``shard_size`` (the coordinates processed together) does not
change the result. The rule is translation-equivariant, so running on deltas equals running on full
parameters minus the global model. ``tau_eps`` (1e-7 in the paper's code) is an absolute floor on
``tau``, in the units of the updates.

Implementation: on CPU, each block of ``shard_size`` coordinates is transposed to one row per
coordinate and the ``n (n - 1)`` slopes of a few coordinates at a time are built in a cache-sized
buffer and sorted as int32 keys (non-negative floats sort like their bits), on
``torch.get_num_threads()`` threads. The numbers are those of the direct torch formulation
(``repeated_median_line`` / ``residual_shard``, kept as the CUDA path): the same float32
operations, so slopes, lines and clipping decisions agree bitwise and the confidences to float64
rounding. The rule is registered with a ``ColumnPlan``: its per-coordinate work can run in Ray
shards (``ray_fedit.federation.sharded``) or on a GPU; the final reweighting needs every
coordinate's confidence and runs once, in the caller.

Assumptions: ``n >= 3``; outliers show up as large residuals coordinate by coordinate. The cost is
``O(n^2 log n)`` per coordinate: the ``n (n - 1)`` slopes of every coordinate are sorted, which is
most of the time at ``n = 50`` (see docs/aggregators.md for measurements).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ray_fedit.aggregators.base import (
    AggregationResult,
    ColumnPart,
    ColumnPlan,
    accepted_params,
    combine,
    keys_to_values,
    map_chunks,
    order_keys,
    require_int,
    require_number,
    scratch,
    stitch,
    thread_map,
    validate_inputs,
)
from ray_fedit.errors import AggregationError
from ray_fedit.registry import AGGREGATORS

# Slopes built and sorted at once: 2**16 float32 (256 KB) stay in the L2 cache.
_SLOPE_ELEMS = 1 << 16


def _check(n: int, params: dict[str, Any]) -> None:
    if n < 3:
        raise AggregationError(
            f"residual needs n >= 3 clients per round for its repeated-median fit; got n={n}. "
            "Sample at least 3 clients or use mean"
        )
    require_number("residual", "lam", params["lam"], strict=True)
    require_number("residual", "threshold", params["threshold"])
    require_int("residual", "shard_size", params["shard_size"], minimum=1)
    require_number("residual", "tau_eps", params["tau_eps"], strict=True)


# --------------------------------------------------------------------------------------------------
# The direct torch formulation (any device; the reference for the numpy kernel below)
# --------------------------------------------------------------------------------------------------


def _median_last(x: Tensor) -> Tensor:
    """Median along the last dim of an already sorted tensor (mean of the middle two if even)."""
    m = x.shape[-1]
    if m % 2:
        return x[..., m // 2]
    return (x[..., m // 2 - 1] + x[..., m // 2]) / 2.0


def repeated_median_line(y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Siegel's repeated-median fit of each row's values against their ranks.

    Materialises the ``(s, n, n)`` slopes, so keep ``s`` small on CPU; the CPU rule uses the
    chunked numpy kernel instead.

    Args:
        y: ``(s, n)`` values, one row per coordinate, one column per client.

    Returns:
        ``(slope (s,), intercept (s,), ranks (s, n))`` with ranks ``0..n-1`` (stable for ties).
    """
    s, n = y.shape
    order = torch.sort(y, dim=1, stable=True)
    ys = order.values
    ranks = torch.empty_like(y)
    steps = torch.arange(n, dtype=y.dtype, device=y.device)
    ranks.scatter_(1, order.indices, steps.expand(s, n))
    gap = steps[:, None] - steps[None, :]
    gap.fill_diagonal_(1.0)
    slopes = (ys[:, :, None] - ys[:, None, :]) / gap
    # The i == j entry must not count: push it to the end of every sorted row and drop it.
    slopes.diagonal(dim1=1, dim2=2).fill_(math.inf)
    inner = _median_last(torch.sort(slopes, dim=2).values[..., : n - 1])
    slope = _median_last(torch.sort(inner, dim=1).values)
    intercept = _median_last(ys) - slope * (n - 1) / 2.0
    return slope, intercept, ranks


def robust_scale(resid: Tensor, tau_eps: float) -> Tensor:
    """Per row ``tau = 1.4826 (1 + 5/(n-1)) M + tau_eps``, ``M`` = median of the n-1 largest |r|.

    Dropping the smallest absolute residual follows the reference code (with a repeated-median fit
    at least one residual is typically near zero).
    """
    n = resid.shape[1]
    spread = _median_last(torch.sort(resid.abs(), dim=1).values[:, 1:])
    return 1.4826 * (1.0 + 5.0 / (n - 1)) * spread + tau_eps


def residual_shard(
    y: Tensor, lam: float, threshold: float, tau_eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Huber weights, confidences and clipped values for a shard of coordinates (torch).

    Args:
        y: ``(s, n)`` values (rows are coordinates).

    Returns:
        ``(weights (s, n), confidence (n,) float64, clipped (s, n))``.
    """
    n = y.shape[1]
    slope, intercept, ranks = repeated_median_line(y)
    line = intercept[:, None] + slope[:, None] * ranks
    resid = y - line
    e = resid / robust_scale(resid, tau_eps)[:, None]
    centre = (n - 1) / 2.0
    leverage = 1.0 / n + (ranks - centre) ** 2 / (n * (n * n - 1) / 12.0)
    root = torch.sqrt(1.0 - leverage)
    k = lam * math.sqrt(2.0 / n)
    z = e.abs() / root
    w = torch.where(z <= k, 1.0, k / z)
    confidence = (w * w.std(dim=1, keepdim=True)).sum(dim=0, dtype=torch.float64)
    clipped = torch.where(w >= threshold, y, line)
    return w, confidence, clipped


# --------------------------------------------------------------------------------------------------
# The CPU kernel: the same float32 operations, vectorised over coordinates with numpy
# --------------------------------------------------------------------------------------------------


def _median_sorted(x: np.ndarray) -> np.ndarray:
    """numpy ``_median_last``: the same float32 operations on an already sorted last axis."""
    m = x.shape[-1]
    if m % 2:
        return x[..., m // 2]
    return (x[..., m // 2 - 1] + x[..., m // 2]) / np.float32(2.0)


@functools.cache
def _rank_tables(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``i - j`` (diagonal 1), the ranks ``0..n-1``, and ``sqrt(1 - leverage)`` per rank.

    The leverage table is ``residual_shard``'s torch expression on each rank value: torch's
    float32 ``sqrt`` differs from numpy's in the last bit for some inputs.
    """
    steps = np.arange(n, dtype=np.float32)
    gap = steps[:, None] - steps[None, :]
    np.fill_diagonal(gap, 1.0)
    ranks = torch.from_numpy(steps)
    leverage = 1.0 / n + (ranks - (n - 1) / 2.0) ** 2 / (n * (n * n - 1) / 12.0)
    return gap, steps, torch.sqrt(1.0 - leverage).numpy()


def _sort_with_order(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each row of ``y`` sorted, and the client at every sorted position (stable for ties).

    One int64 sort of ``(order key << 32) | client`` gives both at once.
    """
    c, n = y.shape
    keys = scratch("keys", (c, n), np.int32)
    packed = scratch("packed", (c, n), np.int64)
    np.copyto(packed, order_keys(y, out=keys))
    packed <<= 32
    packed |= np.arange(n, dtype=np.int64)
    packed.sort(axis=1)
    np.right_shift(packed, 32, out=keys, casting="unsafe")
    packed &= 0xFFFFFFFF  # the clients, in place (the buffer is not read again for keys)
    return keys_to_values(keys), packed


def _repeated_median_slope(ys: np.ndarray) -> np.ndarray:
    """The repeated-median slope of each sorted row of ``ys`` against the ranks ``0..n-1``.

    Slope ``(i, j)`` is ``repeated_median_line``'s ``(ys_i - ys_j) / (i - j)``. As the rows are
    sorted, no slope is negative (a zero can be ``-0.0``, whose bits are the int32 minimum), so
    the slopes sort as their int32 bits; the diagonal is set to that minimum too and the first
    entry of every sorted row is dropped (it is the diagonal, or a zero slope whose value equals
    the diagonal's: the kept values are the same numbers either way).
    """
    c, n = ys.shape
    gap = _rank_tables(n)[0]
    step = max(1, _SLOPE_ELEMS // (n * n))
    inner = scratch("inner", (c, n), np.float32)
    for s in range(0, c, step):
        block = ys[s : s + step]
        m = block.shape[0]
        slopes = scratch("slopes", (m, n, n), np.float32)
        np.subtract(block[:, :, None], block[:, None, :], out=slopes)
        slopes /= gap
        keys = slopes.view(np.int32)
        keys.reshape(m, n * n)[:, :: n + 1] = np.iinfo(np.int32).min
        keys.sort(axis=2)
        inner[s : s + m] = _median_sorted(slopes[:, :, 1:])
    inner.view(np.int32).sort(axis=1)
    return _median_sorted(inner)


def _scatter_by_rank(flat_order: np.ndarray, table: np.ndarray, name: str) -> np.ndarray:
    """``out[c, order[c, r]] = table[r]``: a per-rank value placed at each client.

    ``flat_order`` is ``order`` as indices into the flattened ``(c, n)`` array (a flat
    assignment was 3-4x faster than ``np.put_along_axis``).
    """
    c, n = flat_order.shape
    out = scratch(name, (c, n), np.float32)
    out.reshape(-1)[flat_order.reshape(-1)] = np.broadcast_to(table, (c, n)).reshape(-1)
    return out


def residual_chunk(
    x: Tensor, lam: float, threshold: float, tau_eps: float
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """``residual_shard`` on an ``(n, c)`` column chunk, as numpy on CPU.

    Returns:
        ``(confidence (n,) float64, (clip mask bits, corrections))``: the mask of clipped entries
        over the chunk's ``(c, n)`` coordinate-major layout, packed with ``np.packbits``, and
        ``line - y`` at those entries in that order.
    """
    n, c = x.shape
    y = scratch("y", (c, n), np.float32)
    np.copyto(y, x.numpy().T)
    ys, order = _sort_with_order(y)
    order += np.arange(0, c * n, n)[:, None]  # flat indices into the (c, n) buffers
    _, steps, root_table = _rank_tables(n)
    slope = _repeated_median_slope(ys)
    intercept = _median_sorted(ys) - slope * np.float32(n - 1) / np.float32(2.0)
    ranks = _scatter_by_rank(order, steps, "ranks")
    line = scratch("line", (c, n), np.float32)
    np.multiply(slope[:, None], ranks, out=line)
    line += intercept[:, None]
    resid = scratch("resid", (c, n), np.float32)
    np.subtract(y, line, out=resid)
    size = scratch("size", (c, n), np.float32)
    np.abs(resid, out=size)
    size.view(np.int32).sort(axis=1)
    tau = np.float32(1.4826 * (1.0 + 5.0 / (n - 1))) * _median_sorted(size[:, 1:])
    tau += np.float32(tau_eps)
    # z = |resid / tau| / sqrt(1 - leverage), in the size buffer
    np.divide(resid, tau[:, None], out=size)
    np.abs(size, out=size)
    size /= _scatter_by_rank(order, root_table, "root")
    k = np.float32(lam * math.sqrt(2.0 / n))
    near = np.less_equal(size, k, out=scratch("near", (c, n), np.bool_))
    # torch evaluates ``k / z`` as ``reciprocal(z) * k``; do the same for bitwise equal weights.
    w = scratch("w", (c, n), np.float32)
    with np.errstate(divide="ignore"):  # z = 0 is near, whatever its reciprocal
        np.reciprocal(size, out=w)
    w *= k
    np.putmask(w, near, np.float32(1.0))
    spread = w.std(axis=1, ddof=1, dtype=np.float64).astype(np.float32)
    np.multiply(w, spread[:, None], out=size)
    confidence = size.sum(axis=0, dtype=np.float64)
    mask = np.less(w, np.float32(threshold), out=near)
    mask &= np.not_equal(line, y, out=scratch("moved", (c, n), np.bool_))
    fix = np.subtract(line, y, out=resid)  # the residuals are not needed any more
    return confidence, (np.packbits(mask), fix[mask])


def residual_chunk_torch(
    x: Tensor, lam: float, threshold: float, tau_eps: float
) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """``residual_chunk`` through ``residual_shard``, for a chunk on any device."""
    y = x.T.contiguous()
    _, confidence, clipped = residual_shard(y, lam, threshold, tau_eps)
    mask = clipped != y
    fix = (clipped - y)[mask]
    return confidence.cpu().numpy(), (np.packbits(mask.cpu().numpy()), fix.cpu().numpy())


# --------------------------------------------------------------------------------------------------
# The rule as a column plan
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Context:
    p: Tensor
    lam: float
    threshold: float
    tau_eps: float
    shard_size: int


def _prepare(updates: Tensor, weights: Tensor, **params: Any) -> _Context:
    """Input checks; ``params`` not given take ``residual``'s defaults (one signature holds them)."""
    p = validate_inputs(updates, weights)
    kw = {**accepted_params("residual"), **params}
    _check(updates.shape[0], kw)
    return _Context(p, float(kw["lam"]), float(kw["threshold"]), float(kw["tau_eps"]),
                    kw["shard_size"])


def _width(n: int, ctx: _Context) -> int:
    return ctx.shard_size


# Chunks whose clip masks are decoded at once in ``_finish`` (their indices are held until added).
_DECODE_BATCH = 32

# Coordinates per torch call on a device: bounds the (s, n, n) slopes to 2**26 floats (256 MB).
_DEVICE_SLOPE_ELEMS = 1 << 26


def _part(chunks: list[tuple[int, int, np.ndarray, tuple[np.ndarray, np.ndarray]]]) -> ColumnPart:
    """Per-chunk ``(first column, columns, confidence, clipped)`` -> a ``ColumnPart``."""
    sums = torch.from_numpy(np.stack([conf for _, _, conf, _ in chunks]))
    return ColumnPart(None, sums, tuple((first, c, *fix) for first, c, _, fix in chunks))


def _columns(block: Tensor, ctx: _Context, width: int) -> ColumnPart:
    d = block.shape[1]
    results = map_chunks(
        block, width, lambda x: residual_chunk(x, ctx.lam, ctx.threshold, ctx.tau_eps)
    )
    firsts = range(0, d, width)
    return _part([(f, min(width, d - f), *res) for f, res in zip(firsts, results, strict=True)])


def _device_columns(block: Tensor, ctx: _Context) -> ColumnPart:
    n, d = block.shape
    step = max(ctx.shard_size, _DEVICE_SLOPE_ELEMS // (n * n))
    chunks = []
    for first in range(0, d, step):
        x = block[:, first : first + step]
        chunks.append(
            (first, x.shape[1], *residual_chunk_torch(x, ctx.lam, ctx.threshold, ctx.tau_eps))
        )
    return _part(chunks)


def mean_over_scaled(p: Tensor, scale: Tensor) -> Tensor:
    """Normalise ``p * scale`` to sum to 1.

    Raises:
        AggregationError: if every client with a positive confidence has size 0.
    """
    raw = p.to(torch.float64) * scale
    total = float(raw.sum())
    if total <= 0.0:
        raise AggregationError(
            "residual: the clients it trusts all have weight 0; give every client a positive "
            "weight (its example count)"
        )
    return (raw / total).to(torch.float32)


def _finish(
    updates: Tensor, weights: Tensor, ctx: _Context, parts: list[tuple[int, ColumnPart]]
) -> AggregationResult:
    n, d = updates.shape
    _, confidence = stitch(n, parts)
    top = float(confidence.max())
    no_separation = top <= 0.0
    coeffs = ctx.p if no_separation else mean_over_scaled(ctx.p, (confidence / top) ** 2)
    aggregate = combine(updates, coeffs)
    # The clipped values enter as corrections (line - y) * c_i, so no second (n, d) matrix exists.
    # Decoding the masks runs on threads; the corrections are added in column order.
    def decode(chunk: tuple[int, int, np.ndarray, np.ndarray]) -> tuple[Tensor, Tensor]:
        start, c, bits, vals = chunk
        cols, rows = np.unpackbits(bits, count=c * n).reshape(c, n).nonzero()
        # Parts from Ray tasks hold read-only arrays; torch wants writable ones.
        vals = np.require(vals, requirements="W")
        fix = torch.from_numpy(vals) * coeffs[torch.from_numpy(rows)]
        return torch.from_numpy(cols + start), fix

    chunks = [(block_start + first, c, bits, vals)
              for block_start, part in parts for first, c, bits, vals in part.extra]
    n_fixed = 0
    for at in range(0, len(chunks), _DECODE_BATCH):  # batches bound the decoded indices held
        for cols, fix in thread_map(decode, chunks[at : at + _DECODE_BATCH]):
            if cols.numel():
                n_fixed += cols.numel()
                aggregate.index_add_(0, cols, fix)
    info: dict[str, Any] = {
        "confidence": confidence.tolist(),
        "clipped_fraction": n_fixed / (n * d),
        "no_separation": no_separation,
    }
    if no_separation:
        info["fallback"] = (f"residual: no coordinate separates the n={n} clients (every "
                            "confidence is 0, as always at n=3), so each is trusted by its size "
                            "alone: the size-weighted mean of the clipped values")
    return AggregationResult(aggregate, coeffs, info)


RESIDUAL = ColumnPlan(_prepare, _width, _columns, _finish, _device_columns)


@AGGREGATORS.register(
    "residual",
    check=_check,
    robust=True,
    ignores_weights=False,
    reduces_to_mean=None,
    column_plan=RESIDUAL,
)
def residual(
    updates: Tensor,
    weights: Tensor,
    *,
    lam: float = 2.0,
    threshold: float = 0.05,
    shard_size: int = 2000,
    tau_eps: float = 1e-7,
) -> AggregationResult:
    """Residual-based reweighting over the client updates.

    Args:
        updates: ``(n, d)`` float32 client deltas.
        weights: ``(n,)`` client sizes, multiplied into the final reweighting.
        lam: Huber threshold multiplier (``LAMBDA`` = 2.0 in the paper).
        threshold: Huber weight below which a value is clipped to the line (0.05 in the paper).
        shard_size: coordinates processed together (memory and threading only); Ray shards of
            ``ray_fedit.federation.sharded`` start at multiples of it.
        tau_eps: absolute floor added to the robust scale.

    Returns:
        The reweighted mean of the clipped values; ``client_weights`` are the final ``c``;
        ``info`` holds ``confidence``, ``clipped_fraction`` and ``no_separation`` (and
        ``fallback`` when that is True).

    Raises:
        AggregationError: invalid inputs or parameters (``n < 3``).
    """
    return RESIDUAL(
        updates, weights, lam=lam, threshold=threshold, shard_size=shard_size, tau_eps=tau_eps
    )
