"""How features are assigned to codes: the nearest code, and OptVQ's Sinkhorn-Knopp transport plan.

Plain functions on (N, d) rows and (K, d) codes, used by the quantizer modules of `quantization.py`; no parameters.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

COST_NORMALIZATIONS = ("all", "dim", "none")

# Largest spread, in units of the log-kernel, between a row's best and worst code up to which the solver works in the
# exp domain: the kernel exponentiated once, every Sinkhorn step a float32 matrix-vector product whose result is
# checked against underflow, the few sums it cannot vouch for recomputed exactly. Real features spread over 50 to 100
# units (epsilon 10, "all" normalisation; benchmarks/README.md). Beyond a few hundred units most sums underflow, their
# repair becomes the rule, and the log domain (exact for any spread, an exp per entry and step) is faster.
EXP_DOMAIN_MAX_SPREAD = 400.0

# Streaming (no (N, K) matrix at all) is chosen automatically when one float32 (N, K) matrix would exceed this.
STREAMING_MIN_BYTES = 4 * 2**30

# On CPU the solver computes and transforms the (N, K) matrix in row tiles of about this many entries (4 MiB), so that
# the several operations on a tile find it in the cache; on a GPU a tile has `chunk_size` rows.
CPU_TILE_ENTRIES = 2**20

# The exp domain's underflow certificate. The log-kernel is clamped at _LOG_FLOOR before exponentiation, so every
# kernel entry is a normal float32 number (exp with denormal results is several times slower on CPU). A float32 sum
# of kernel entries times weights in [0, 1] can then misstate each of its terms by less than _LOST_TERM (a clamped
# entry, or a product that underflows), and in no other way beyond rounding. A sum is trusted when all its terms
# together cannot misstate it by more than _TRUSTED_SHARE of its value (far below float32 rounding); the others are
# recomputed in the log domain. A row's argmax is trusted when its winning product is far above anything an
# underflow can produce.
_LOG_FLOOR = -87.0
_LOST_TERM = 2.0**-125
_TRUSTED_SHARE = 2.0**-30
_ARGMAX_FLOOR = 2.0**-100


# ---------------------------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp
# ---------------------------------------------------------------------------------------------------------------------
def sinkhorn(cost: torch.Tensor, epsilon: float = 1.0, iterations: int = 3) -> torch.Tensor:
    """
    Entropy-regularised transport plan between N rows (uniform mass 1/N) and K codes (uniform mass 1/K).

    Starts from the kernel `exp(-epsilon * cost)` and alternately scales its columns to mass 1/K and its rows to mass
    1/N, `iterations` times, exactly as the original OptVQ (and SwAV) do; the returned plan is rescaled so that each
    row sums to 1 (row i is the assignment distribution of row i). Computed in the log domain in float64, so no
    entry underflows and the result is finite for any finite cost.

    Args:
        cost: (N, K) cost matrix.
        epsilon: inverse temperature of the kernel.
        iterations: number of column + row scaling rounds.

    Returns:
        (N, K) plan in the dtype of `cost`, each row summing to 1.
    """
    if cost.ndim != 2:
        raise ValueError(f"sinkhorn expects a 2-D (N, K) cost matrix, got shape {tuple(cost.shape)}")
    if not torch.isfinite(cost).all():
        raise ValueError("sinkhorn got a cost matrix with NaN or Inf entries")
    log_kernel = cost.double() * -float(epsilon)
    # Each row is shifted so that its best entry is 0 (no overflow); the row potential starts at the shift, so the
    # iterations are those of the unshifted kernel started from uniform row weights, as in the original.
    row_shift = log_kernel.amax(dim=1)
    log_kernel = log_kernel - row_shift[:, None]
    num_rows, num_codes = log_kernel.shape
    row_potential = row_shift
    code_potential = torch.zeros(num_codes, dtype=log_kernel.dtype, device=log_kernel.device)
    for _ in range(iterations):
        code_potential = -math.log(num_codes) - torch.logsumexp(log_kernel + row_potential[:, None], dim=0)
        row_potential = -math.log(num_rows) - torch.logsumexp(log_kernel + code_potential[None, :], dim=1)
    return torch.softmax(log_kernel + code_potential[None, :], dim=1).to(cost.dtype)


def _all_reduce(tensor: torch.Tensor, op=None) -> torch.Tensor:
    dist.all_reduce(tensor, op=op if op is not None else dist.ReduceOp.SUM)
    return tensor


class _DistanceTiles:
    """
    Euclidean distances between rows and codes by blocks, with the arithmetic of `torch.cdist` (one matrix product of
    the rows and codes augmented with their squared norms, then clamp and sqrt), written into a given buffer: a block
    of rows holds the values `torch.cdist` gives for them (bit for bit on the CPUs tried, whatever the blocking; a GPU
    library may pick another kernel for another shape and round differently).
    """

    def __init__(self, rows: torch.Tensor, codes: torch.Tensor):
        self.rows = torch.cat([rows.mul(-2), rows.pow(2).sum(-1, keepdim=True), rows.new_ones(rows.shape[0], 1)], 1)
        self.codes = torch.cat([codes, codes.new_ones(codes.shape[0], 1), codes.pow(2).sum(-1, keepdim=True)], 1)

    def compute(self, rows, codes=None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Distances of `rows` (a slice or an index tensor) to `codes` (an index tensor, or None for all)."""
        code_rows = self.codes if codes is None else self.codes[codes]
        return torch.matmul(self.rows[rows], code_rows.T, out=out).clamp_min_(1e-30).sqrt_()


def _row_ranges(num_rows: int, tile_rows: int):
    for start in range(0, num_rows, tile_rows):
        yield start, min(start + tile_rows, num_rows)


class _Kernel:
    """
    The Sinkhorn kernel by row tiles: the log-kernel A = -scale * (D - row_min - code_shift), or exp(A) in the exp
    domain. Every row and every column of A has maximum 0 (the shifts are carried by the potentials), which keeps as
    many entries as possible inside float32's range.

    Materialised (`buffer` given), the tiles are views of one (N, K) matrix that holds the distances and is turned
    into the kernel in place on the first pass; after it, an exp-domain kernel is one tile (the whole matrix), so that
    each Sinkhorn step is one matrix-vector product (few large operations: the cost of an operation is mostly its
    memory traffic, and on a busy machine each parallel operation also waits for descheduled threads). Streaming,
    each tile is recomputed from the features on every pass into `tile_buffer`, with the same arithmetic, so both
    modes see bit-identical kernel entries.
    """

    def __init__(
        self,
        distances: _DistanceTiles,
        buffer: torch.Tensor | None,
        tile_buffer: torch.Tensor | None,
        tile_rows: int,
        row_min: torch.Tensor,
        code_shift: torch.Tensor,
        scale: float,
        exp_domain: bool,
    ):
        self.distances, self.buffer, self.tile_buffer, self.tile_rows = distances, buffer, tile_buffer, tile_rows
        self.row_min, self.code_shift, self.scale, self.exp_domain = row_min, code_shift, scale, exp_domain
        self._transformed = False

    def ranges(self):
        return _row_ranges(self.row_min.shape[0], self.tile_rows)

    def tiles(self):
        """(start, stop, tile) over the row tiles."""
        if self.buffer is not None and self._transformed and self.exp_domain:
            if self.buffer.shape[0]:  # a rank may hold no rows
                yield 0, self.buffer.shape[0], self.buffer
            return
        for start, stop in self.ranges():
            if self.buffer is None:
                distances = self.distances.compute(slice(start, stop), out=self.tile_buffer[: stop - start])
                tile = self._transform(distances, start, stop)
            elif self._transformed:
                tile = self.buffer[start:stop]
            else:
                tile = self._transform(self.buffer[start:stop], start, stop)
            yield start, stop, tile
        self._transformed = True

    def _transform(self, tile: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        tile.sub_(self.row_min[start:stop, None]).sub_(self.code_shift).mul_(-self.scale)
        return tile.clamp_(min=_LOG_FLOOR).exp_() if self.exp_domain else tile

    def log_block(self, rows, codes=None) -> torch.Tensor:
        """Log-kernel entries of `rows` x `codes` in float64, recomputed from the features (no clamping)."""
        shift = self.code_shift if codes is None else self.code_shift[codes]
        block = self.distances.compute(rows, codes).sub_(self.row_min[rows, None]).sub_(shift)
        return block.mul_(-self.scale).double()


# -- the two ways of summing over the kernel --------------------------------------------------------------------------
# Each gives the row log-sum-exp of A + h (code potentials h), a column accumulator of A + f (row potentials f) and
# the row argmax of A + h; the exp domain also says which of its results it cannot vouch for.
class _ExpDomain:
    """Sums over exp(A) as float32 matrix-vector products, each checked against float32 underflow."""

    def row_lse(self, tile: torch.Tensor, code_potential: torch.Tensor):
        offset = code_potential.max()
        mass = torch.mv(tile, (code_potential - offset).exp().float())
        untrusted = mass < tile.shape[1] * _LOST_TERM / _TRUSTED_SHARE
        return mass.double().log() + offset, untrusted

    def columns(self, num_codes: int, total_rows: int, device: torch.device) -> _ExpColumns:
        return _ExpColumns(num_codes, total_rows, device)

    def argmax(self, tile: torch.Tensor, code_potential: torch.Tensor):
        # In place: the argmax is the kernel's last use.
        best, indices = tile.mul_((code_potential - code_potential.max()).exp().float()).max(dim=1)
        return indices, best < _ARGMAX_FLOOR


class _ExpColumns:
    """Column log-sum-exp of A + f over row tiles: float32 products with tile weights exp(f - max f) <= 1, accumulated
    in float64 against the running maximum of f."""

    def __init__(self, num_codes: int, total_rows: int, device: torch.device):
        self.offset = torch.tensor(-math.inf, dtype=torch.float64, device=device)
        self.mass = torch.zeros(num_codes, dtype=torch.float64, device=device)
        self.trusted_mass = total_rows * _LOST_TERM / _TRUSTED_SHARE

    def add(self, tile: torch.Tensor, row_potential: torch.Tensor) -> None:
        tile_offset = row_potential.max()
        offset = torch.maximum(self.offset, tile_offset)
        partial = torch.mv(tile.T, (row_potential - tile_offset).exp().float())
        self.mass.mul_((self.offset - offset).exp()).add_(partial.double() * (tile_offset - offset).exp())
        self.offset = offset

    def result(self, distributed: bool):
        if distributed:
            offset = _all_reduce(self.offset.reshape(1).clone(), dist.ReduceOp.MAX)[0]
            self.mass.mul_((self.offset - offset).exp())
            self.offset = offset
            _all_reduce(self.mass)
        return self.mass.log() + self.offset, self.mass < self.trusted_mass


class _LogDomain:
    """Sums over the log-kernel A by streaming log-sum-exp: exact for any spread, an exp per entry and step."""

    def __init__(self, scratch: torch.Tensor):
        self.scratch = scratch

    def row_lse(self, tile: torch.Tensor, code_potential: torch.Tensor):
        offset = code_potential.max()
        shifted = torch.add(tile, (code_potential - offset).float(), out=self.scratch[: tile.shape[0]])
        return torch.logsumexp(shifted, dim=1).double() + offset, None

    def columns(self, num_codes: int, total_rows: int, device: torch.device) -> _LogColumns:
        return _LogColumns(num_codes, device, self.scratch)

    def argmax(self, tile: torch.Tensor, code_potential: torch.Tensor):
        # In place: the argmax is the kernel's last use.
        return tile.add_((code_potential - code_potential.max()).float()).argmax(dim=1), None


class _LogColumns:
    """Column log-sum-exp of A + f over row tiles: running maximum and sum of exponentials per column."""

    def __init__(self, num_codes: int, device: torch.device, scratch: torch.Tensor):
        self.maximum = torch.full((num_codes,), -math.inf, dtype=torch.float64, device=device)
        self.total = torch.zeros(num_codes, dtype=torch.float64, device=device)
        self.scratch = scratch

    def add(self, tile: torch.Tensor, row_potential: torch.Tensor) -> None:
        tile_offset = row_potential.max()
        block = torch.add(tile, (row_potential - tile_offset).float()[:, None], out=self.scratch[: tile.shape[0]])
        maximum = torch.maximum(self.maximum, block.amax(dim=0).double() + tile_offset)
        exponentials = block.sub_((maximum - tile_offset).float()).exp_().sum(dim=0).double()
        self.total.mul_((self.maximum - maximum).exp().nan_to_num_(nan=0.0)).add_(exponentials)
        self.maximum = maximum

    def result(self, distributed: bool):
        if distributed:
            maximum = _all_reduce(self.maximum.clone(), dist.ReduceOp.MAX)
            self.total.mul_((self.maximum - maximum).exp().nan_to_num_(nan=0.0))
            self.maximum = maximum
            _all_reduce(self.total)
        return self.maximum + self.total.log(), None


# -- the solver -------------------------------------------------------------------------------------------------------
class _SinkhornSolver:
    """
    Sinkhorn assignment of N rows to K codes: the argmax of each row of the plan P = diag(a) exp(-s * D') diag(b) of
    their normalised distance matrix D', with the original's iterations (codes first, `iterations` rounds, from
    uniform row weights), without its extra (N, K) matrices.

    - The scalings are float64 log-potentials (vectors); the matrix is never rescaled. Only the code potentials matter
      for the argmax, so the last row step is skipped.
    - Materialised mode: one (N, K) float32 buffer holds the distances, then the kernel in place. Streaming mode: no
      (N, K) matrix; each row tile is recomputed from the features on every pass (memory O(tile x K)). Same tiles,
      same arithmetic: identical assignments.
    - `iterations + 2` passes: the first computes the distances and every statistic the normalisation needs (mean and
      std by per-tile sums, row minima, code shifts, spread) tile by tile; the second makes the kernel and the first
      column step; each later one does a row step and the next column step (on each tile in turn when streaming, so
      that a recomputed tile serves both; as two matrix-vector products over the whole matrix when materialised); the
      last takes the argmax.
    - Exp domain (spread up to EXP_DOMAIN_MAX_SPREAD): the kernel is exponentiated once and every step is a float32
      matrix-vector product whose result is checked against underflow; the few sums it cannot vouch for (rows or
      codes far from everything) are recomputed exactly in the log domain from the features. Log domain (beyond):
      streaming log-sum-exp, exact for any spread.

    When `distributed` is set, the rows are the local share of a batch spread over the ranks of the default process
    group: the cost statistics, the code shifts, the row count and the column sums are reduced across ranks, so each
    rank gets exactly the assignment its rows would get if the whole batch were solved in one process.
    """

    def __init__(
        self,
        epsilon: float,
        iterations: int,
        normalization: str,
        chunk_size: int,
        distributed: bool,
        streaming: bool | None = None,
    ):
        self.epsilon = float(epsilon)
        self.iterations = int(iterations)
        self.normalization = normalization
        self.chunk_size = int(chunk_size)
        self.distributed = distributed
        self.streaming = streaming

    def uses_streaming(self, num_rows: int, num_codes: int) -> bool:
        if self.streaming is not None:
            return bool(self.streaming)
        return num_rows * num_codes * 4 > STREAMING_MIN_BYTES

    def tile_rows(self, num_rows: int, num_codes: int, device: torch.device) -> int:
        rows = self.chunk_size if device.type != "cpu" else min(self.chunk_size, CPU_TILE_ENTRIES // num_codes)
        return max(1, min(rows, num_rows))

    # -- the normalisation ------------------------------------------------------------------------------------------
    def kernel_scale(self, std: float, code_dim: int) -> float:
        """s such that the log-kernel is -s * D up to per-row and per-code constants (which the potentials absorb)."""
        if self.normalization == "dim":
            return self.epsilon / math.sqrt(code_dim)
        if self.normalization == "none":
            return self.epsilon
        # "all": D' = (D - mean) / (std + 1e-6) - min(...): the mean and the min are constant shifts, only std matters.
        return self.epsilon / (std + 1e-6)

    def statistics(
        self,
        distances: _DistanceTiles,
        buffer: torch.Tensor | None,
        tile_buffer: torch.Tensor | None,
        scratch: torch.Tensor,
    ):
        """
        The first pass: computes each distance tile (into `buffer` when materialised, else into `tile_buffer`).
        Returns the unbiased std of all distances of all ranks, the largest row range, the row minima and the code
        shifts (the minimum over all rows of all ranks of D - row_min).
        """
        num_rows, num_codes, device = distances.rows.shape[0], distances.codes.shape[0], scratch.device
        row_min = torch.empty(num_rows, device=device)
        code_shift = torch.full((num_codes,), math.inf, device=device)
        largest_range = torch.zeros((), device=device)
        # Per tile: its float32 mean m_t and the sum of squared deviations from it. The sums of n_t, n_t m_t, n_t m_t^2
        # and the deviations combine exactly in float64 into the variance of the whole matrix: one pass, no
        # catastrophic cancellation.
        moments = torch.zeros(4, dtype=torch.float64, device=device)
        for start, stop in _row_ranges(num_rows, scratch.shape[0]):
            out = tile_buffer[: stop - start] if buffer is None else buffer[start:stop]
            tile = distances.compute(slice(start, stop), out=out)
            spare = scratch[: stop - start]
            if self.normalization == "all":
                mean = tile.sum() / tile.numel()
                deviations = torch.sub(tile, mean, out=spare).square_().sum().double()
                count, mean = torch.full_like(deviations, tile.numel()), mean.double()
                moments += torch.stack([count, count * mean, count * mean * mean, deviations])
            tile_min = tile.amin(dim=1)
            row_min[start:stop] = tile_min
            torch.maximum(largest_range, (tile.amax(dim=1) - tile_min).max(), out=largest_range)
            torch.minimum(code_shift, torch.sub(tile, tile_min[:, None], out=spare).amin(dim=0), out=code_shift)
        if self.distributed:
            _all_reduce(moments)
            extremes = _all_reduce(torch.cat([-largest_range.reshape(1), code_shift]), dist.ReduceOp.MIN)
            largest_range, code_shift = -extremes[0], extremes[1:]
        count, first, second, deviations = moments.tolist()
        variance = max(deviations + second - first * first / max(count, 1.0), 0.0) / max(count - 1.0, 1.0)
        return math.sqrt(variance), largest_range.item(), row_min, code_shift

    def total_rows(self, num_rows: int, device: torch.device) -> int:
        if not self.distributed:
            return num_rows
        count = torch.tensor([num_rows], dtype=torch.float64, device=device)
        return int(_all_reduce(count).item())

    # -- assignment -----------------------------------------------------------------------------------------------
    def assign(self, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Index (N,) of the argmax of each row of the Sinkhorn plan of the (N, d) rows' distances to the K codes."""
        num_rows, num_codes = rows.shape[0], codes.shape[0]
        if num_rows == 0 and not self.distributed:
            return torch.empty(0, dtype=torch.long, device=rows.device)
        tile_rows = self.tile_rows(num_rows, num_codes, rows.device)
        streaming = self.uses_streaming(num_rows, num_codes)
        buffer = None if streaming else rows.new_empty(num_rows, num_codes)
        tile_buffer = rows.new_empty(tile_rows, num_codes) if streaming else None
        scratch = rows.new_empty(tile_rows, num_codes)
        distances = _DistanceTiles(rows, codes)
        std, largest_range, row_min, code_shift = self.statistics(distances, buffer, tile_buffer, scratch)
        scale = self.kernel_scale(std, codes.shape[1])
        exp_domain = largest_range * scale <= EXP_DOMAIN_MAX_SPREAD
        kernel = _Kernel(distances, buffer, tile_buffer, tile_rows, row_min, code_shift, scale, exp_domain)
        return self.iterate(kernel, _ExpDomain() if exp_domain else _LogDomain(scratch))

    def iterate(self, kernel: _Kernel, domain) -> torch.Tensor:
        device = kernel.row_min.device
        num_rows, num_codes = kernel.row_min.shape[0], kernel.code_shift.shape[0]
        total_rows = self.total_rows(num_rows, device)
        log_rows, log_codes = math.log(total_rows), math.log(num_codes)
        # The row potentials start at -scale * row_min, those of the unshifted kernel exp(-scale * D) from uniform row
        # weights, as in the original.
        row_potential = kernel.row_min.double() * -kernel.scale
        code_potential = None
        for iteration in range(self.iterations):
            columns = domain.columns(num_codes, total_rows, device)
            for start, stop, tile in kernel.tiles():
                if iteration > 0:
                    lse, untrusted = domain.row_lse(tile, code_potential)
                    if untrusted is not None and bool(untrusted.any()):
                        bad = untrusted.nonzero()[:, 0]
                        lse[bad] = torch.logsumexp(kernel.log_block(bad + start) + code_potential, dim=1)
                    row_potential[start:stop] = -log_rows - lse
                columns.add(tile, row_potential[start:stop])
            lse, untrusted = columns.result(self.distributed)
            if untrusted is not None and bool(untrusted.any()):
                bad = untrusted.nonzero()[:, 0]
                lse[bad] = self.exact_column_lse(kernel, row_potential, bad)
            code_potential = -log_codes - lse
        indices = torch.empty(num_rows, dtype=torch.long, device=device)
        for start, stop, tile in kernel.tiles():
            chosen, untrusted = domain.argmax(tile, code_potential)
            if untrusted is not None and bool(untrusted.any()):
                bad = untrusted.nonzero()[:, 0]
                chosen[bad] = (kernel.log_block(bad + start) + code_potential).argmax(dim=1)
            indices[start:stop] = chosen
        return indices

    def exact_column_lse(self, kernel: _Kernel, row_potential: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Log-sum-exp over all rows (of all ranks) of A + f for a few codes, in float64 from the features."""
        maximum = torch.full(codes.shape, -math.inf, dtype=torch.float64, device=codes.device)
        total = torch.zeros_like(maximum)
        for start, stop in kernel.ranges():
            block = kernel.log_block(slice(start, stop), codes) + row_potential[start:stop, None]
            new_maximum = torch.maximum(maximum, block.amax(dim=0))
            total = total * (maximum - new_maximum).exp().nan_to_num(nan=0.0) + (block - new_maximum).exp().sum(dim=0)
            maximum = new_maximum
        if self.distributed:
            new_maximum = _all_reduce(maximum.clone(), dist.ReduceOp.MAX)
            total = _all_reduce(total * (maximum - new_maximum).exp().nan_to_num(nan=0.0))
            maximum = new_maximum
        return maximum + total.log()


def nearest_codes(rows: torch.Tensor, codes: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Index (N,) of the nearest code of each row; chunked so that no (N, K) matrix is held."""
    out = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
    for start in range(0, rows.shape[0], chunk_size):
        block = rows[start : start + chunk_size]
        out[start : start + chunk_size] = torch.cdist(block, codes).argmin(dim=1)
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
    """Index (N,) of the argmax of each row of the Sinkhorn plan of the rows' normalised distances to the codes; with
    `distributed`, the plan is over the rows of all ranks."""
    solver = _SinkhornSolver(epsilon, iterations, cost_normalization, chunk_size, distributed, streaming)
    return solver.assign(rows, codes)


def distributed_group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
