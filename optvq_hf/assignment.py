"""How features are assigned to codes: the nearest code, and OptVQ's Sinkhorn-Knopp transport plan.

Plain functions on (N, d) rows and (K, d) codes, used by the quantizer modules of `quantization.py`; no parameters.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

COST_NORMALIZATIONS = ("all", "dim", "none")

# The original's guard, added to every mass before it divides by it (its `sinkhorn`: `Q /= Q.sum(...) + 1e-8`).
GUARD = 1e-8

# Streaming (no (N, K) matrix at all) is chosen automatically when one float32 (N, K) matrix would exceed this.
STREAMING_MIN_BYTES = 4 * 2**30

# Entries of the temporary tiles the log-sum-exp passes work on (16 MiB of float32): bounds the memory beyond the one
# (N, K) matrix whatever the chunk size.
TILE_ENTRIES = 2**22


def _guarded_log(log_mass: torch.Tensor, log_guard: float) -> torch.Tensor:
    """log(S + guard) from log S, exactly: logaddexp(log S, log guard)."""
    return torch.logaddexp(log_mass, torch.full_like(log_mass, log_guard))


def sinkhorn(cost: torch.Tensor, epsilon: float = 1.0, iterations: int = 3, guard: float = GUARD) -> torch.Tensor:
    """
    The original OptVQ `sinkhorn(cost, n_iters, epsilon)`: transport plan between N rows and K codes.

    Starts from the kernel `exp(-epsilon * cost)` normalised to total mass 1, and alternately scales each code's
    column to mass 1/K and each row to mass 1/N, `iterations` times, dividing every mass by `mass + guard` as the
    original does (`guard=0` gives the guard-free Sinkhorn-Knopp); the returned plan is rescaled so that each row
    sums to 1 (the original multiplies by N, which is the same unless a row's own mass falls below the guard).
    Computed in the log domain in float64 (log(S + guard) = logaddexp(log S, log guard)), so no entry
    underflows and the result is finite for any finite cost. The guard is an absolute mass, so the result is not
    invariant to adding a constant to `cost`: with the original's normalised costs (minimum 0) it only changes codes
    or rows whose mass falls far below `guard`.

    Args:
        cost: (N, K) cost matrix.
        epsilon: inverse temperature of the kernel.
        iterations: number of column + row scaling rounds.
        guard: the mass added to each sum before dividing by it.

    Returns:
        (N, K) plan in the dtype of `cost`, each row summing to 1.
    """
    if cost.ndim != 2:
        raise ValueError(f"sinkhorn expects a 2-D (N, K) cost matrix, got shape {tuple(cost.shape)}")
    if not torch.isfinite(cost).all():
        raise ValueError("sinkhorn got a cost matrix with NaN or Inf entries")
    log_kernel = cost.double() * -float(epsilon)
    num_rows, num_codes = log_kernel.shape
    log_guard = math.log(guard) if guard > 0 else -math.inf
    row = -_guarded_log(torch.logsumexp(log_kernel.flatten(), 0), log_guard).expand(num_rows).clone()
    code = torch.zeros(num_codes, dtype=log_kernel.dtype, device=log_kernel.device)
    for _ in range(iterations):
        code = (
            code - _guarded_log(code + torch.logsumexp(log_kernel + row[:, None], 0), log_guard) - math.log(num_codes)
        )
        row = row - _guarded_log(row + torch.logsumexp(log_kernel + code, 1), log_guard) - math.log(num_rows)
    return torch.softmax(log_kernel + code, dim=1).to(cost.dtype)


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM)
    return tensor


def _global_lse(lse: torch.Tensor, distributed: bool) -> torch.Tensor:
    """log-sum-exp over the ranks of per-rank log-sum-exps (elementwise)."""
    if not distributed:
        return lse
    maximum = _all_reduce(lse.clone(), dist.ReduceOp.MAX)
    safe = torch.where(torch.isfinite(maximum), maximum, torch.zeros_like(maximum))
    return safe + _all_reduce((lse - safe).exp()).log()


class _LogKernel:
    """
    The log-kernel A = -epsilon * D' (D' the normalised distances, as the original computes them in float32) by row
    tiles: views of one (N, K) float32 matrix, or (streaming) recomputed from the features on every pass.
    """

    def __init__(self, rows, codes, epsilon, normalization, chunk_size, distributed, streaming):
        num_rows, num_codes = rows.shape[0], codes.shape[0]
        self.rows, self.codes, self.streaming = rows, codes, streaming
        self.tile_rows = max(1, min(chunk_size, TILE_ENTRIES // max(num_codes, 1)))
        self.ranges = [(s, min(s + self.tile_rows, num_rows)) for s in range(0, num_rows, self.tile_rows)]
        self.matrix = None if streaming else torch.cdist(rows, codes)
        self.shift = torch.zeros((), device=rows.device)
        self.scale = torch.tensor(float(epsilon), device=rows.device)
        if normalization == "dim":
            self.scale = self.scale / math.sqrt(codes.shape[1])
        elif normalization == "all":
            self._standardise(distributed)
        self.scale = -self.scale
        if self.matrix is not None:  # in place: the matrix now holds the log-kernel
            self.matrix.sub_(self.shift).mul_(self.scale)

    def distances(self, start: int, stop: int) -> torch.Tensor:
        return torch.cdist(self.rows[start:stop], self.codes)

    def tiles(self):
        for start, stop in self.ranges:
            if self.matrix is not None:
                yield start, stop, self.matrix[start:stop]
            else:
                yield start, stop, self.distances(start, stop).sub_(self.shift).mul_(self.scale)

    def _raw(self):
        for start, stop in self.ranges:
            yield self.matrix[start:stop] if self.matrix is not None else self.distances(start, stop)

    def _standardise(self, distributed: bool) -> None:
        """D' = (D - mean) / (std + 1e-6) - min, over the batch of all ranks: A = -eps / (std + 1e-6) * (D - min D)."""
        if not distributed and self.matrix is not None:  # the original's own float32 reductions
            std, minimum = self.matrix.std(), self.matrix.min()
        else:
            device = self.rows.device
            stats = torch.zeros(2, dtype=torch.float64, device=device)
            minimum = torch.full((), math.inf, device=device)
            for tile in self._raw():
                stats += torch.stack([tile.sum(dtype=torch.float64), torch.tensor(tile.numel(), device=device)])
                minimum = torch.minimum(minimum, tile.min()) if tile.numel() else minimum
            if distributed:
                _all_reduce(stats)
                minimum = _all_reduce(minimum.clone(), dist.ReduceOp.MIN)
            mean = stats[0] / stats[1].clamp_min(1)
            squares = torch.zeros((), dtype=torch.float64, device=device)
            for tile in self._raw():
                squares += (tile.double() - mean).square().sum()
            if distributed:
                _all_reduce(squares)
            std = (squares / (stats[1] - 1).clamp_min(1)).sqrt().float()
        # (D - mean) / (std + 1e-6) - min(that) = (D - min D) / (std + 1e-6): the mean cancels.
        self.shift = minimum
        self.scale = self.scale / (std + 1e-6)


def _sinkhorn_indices(kernel: _LogKernel, num_codes, iterations, distributed, device) -> torch.Tensor:
    """
    The original's guarded Sinkhorn iterations on log-potentials: plan Q_ik = exp(A_ik + f_i + g_k), f and g float64.

    - start: f_i = -log(sum Q + guard);
    - code step: g_k <- g_k - log(exp(g_k + lse_i(A_ik + f_i)) + guard) - log K;
    - row step: f_i <- f_i - log(exp(f_i + lse_k(A_ik + g_k)) + guard) - log N;
    - index: argmax_k A_ik + g_k (the last row step and the final rescaling change no argmax).
    log(S + guard) = logaddexp(log S, log guard). Nothing waits on the host inside the iterations.
    """
    log_guard = math.log(GUARD)
    num_rows = sum(stop - start for start, stop in kernel.ranges)
    total_rows = torch.tensor(float(num_rows), dtype=torch.float64, device=device)
    if distributed:
        _all_reduce(total_rows)
    tile_lse = [torch.logsumexp(tile.flatten(), 0).double() for _, _, tile in kernel.tiles()]
    total = torch.logsumexp(torch.stack(tile_lse), 0) if tile_lse else torch.tensor(-math.inf, device=device)
    total = _global_lse(total.double().reshape(1), distributed)[0]
    row = (-_guarded_log(total, log_guard)).expand(num_rows).clone()
    code = torch.zeros(num_codes, dtype=torch.float64, device=device)
    for iteration in range(iterations):
        column_lse = torch.full((num_codes,), -math.inf, dtype=torch.float64, device=device)
        for start, stop, tile in kernel.tiles():
            offset = row[start:stop].max()
            partial = torch.logsumexp(tile + (row[start:stop] - offset).float()[:, None], 0).double() + offset
            column_lse = torch.logaddexp(column_lse, partial)
        column_lse = _global_lse(column_lse, distributed)
        code = code - _guarded_log(code + column_lse, log_guard) - math.log(num_codes)
        if iteration == iterations - 1:
            break
        shifted_code = (code - code.max()).float()
        for start, stop, tile in kernel.tiles():
            row_lse = torch.logsumexp(tile + shifted_code, 1).double() + code.max()
            row[start:stop] -= _guarded_log(row[start:stop] + row_lse, log_guard) + total_rows.log()
    indices = torch.empty(num_rows, dtype=torch.long, device=device)
    shifted_code = (code - code.max()).float()
    for start, stop, tile in kernel.tiles():
        indices[start:stop] = (tile + shifted_code).argmax(1)
    return indices


def nearest_codes(rows: torch.Tensor, codes: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """
    Index (N,) of the nearest code of each row (Euclidean): argmin_k ||c_k||^2 - 2 r.c_k, the squared distance less
    the row's own norm (same argmin; no sqrt or clamp over the (N, K) matrix), by chunks of `chunk_size` rows.
    """
    out = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
    code_norms = codes.pow(2).sum(1)
    for start in range(0, rows.shape[0], chunk_size):
        block = rows[start : start + chunk_size]
        out[start : start + chunk_size] = torch.addmm(code_norms, block, codes.T, alpha=-2).argmin(dim=1)
    return out


def sinkhorn_codes(
    rows: torch.Tensor,
    codes: torch.Tensor,
    epsilon: float,
    iterations: int,
    cost_normalization: str = "all",
    chunk_size: int = 4096,
    distributed: bool = False,
    streaming: bool | None = None,
) -> torch.Tensor:
    """
    Index (N,) of the argmax of each row of the original's Sinkhorn plan of the rows' normalised distances to the
    codes, its `+1e-8` guards included (see `_sinkhorn_indices`); with `distributed`, the plan (and the cost
    statistics) are over the rows of all ranks.

    The guard is an absolute mass, not a relative one: the plan is not invariant to rescaling the kernel, and with
    16,384 codes most codes start with a mass far below 1e-8, so the guard caps how much they are scaled up. It is
    part of the algorithm (dropping it changes 2-4% of the indices at the paper's sizes).

    Memory: one (N, K) float32 matrix (the log-kernel) plus tiles of `TILE_ENTRIES`; with `streaming` (or
    automatically above `STREAMING_MIN_BYTES`) no (N, K) matrix: each tile is recomputed from the features.
    """
    if cost_normalization not in COST_NORMALIZATIONS:
        raise ValueError(f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {cost_normalization!r}")
    num_rows, num_codes = rows.shape[0], codes.shape[0]
    if num_rows == 0 and not distributed:
        return torch.empty(0, dtype=torch.long, device=rows.device)
    if streaming is None:
        streaming = num_rows * num_codes * 4 > STREAMING_MIN_BYTES
    kernel = _LogKernel(rows, codes, epsilon, cost_normalization, chunk_size, distributed, bool(streaming))
    return _sinkhorn_indices(kernel, num_codes, int(iterations), distributed, rows.device)


def distributed_group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
