"""Vector quantizers with a shared multi-head codebook.

`SinkhornQuantizer` is OptVQ's quantizer: during training, features are assigned to codes by entropy-regularised
optimal transport (Sinkhorn-Knopp on a normalised distance matrix), which keeps every code in use. `VectorQuantizer`
is the plain nearest-neighbour baseline with the same interface.

Both are standalone `nn.Module`s usable in any model. They always compute in float32, also under autocast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from transformers.utils import ModelOutput

COST_NORMALIZATIONS = ("all", "dim", "none")
INFERENCE_ASSIGNMENTS = ("nearest", "sinkhorn")

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


@dataclass
class QuantizerOutput(ModelOutput):
    """
    Output of a quantizer.

    Args:
        quantized (`torch.FloatTensor`): the quantized features, shaped like the input, with straight-through gradients
            to the input.
        indices (`torch.LongTensor`): code indices, (B, num_heads, H, W) for a (B, C, H, W) input and (B, T, num_heads)
            for a (B, T, C) input.
        loss (`torch.FloatTensor`): scalar `mean((z - sg[c])^2) + beta * mean((c - sg[z])^2)`.
    """

    quantized: torch.FloatTensor | None = None
    indices: torch.LongTensor | None = None
    loss: torch.FloatTensor | None = None


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


def _distributed_group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


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


# ---------------------------------------------------------------------------------------------------------------------
# Quantizers
# ---------------------------------------------------------------------------------------------------------------------
class VectorQuantizer(nn.Module):
    """
    Nearest-neighbour vector quantizer with a multi-head shared codebook (the "vq" baseline).

    Each feature of `embed_dim` channels is split into `num_heads` consecutive sub-vectors of `embed_dim / num_heads`
    channels (head j takes channels [j*d, (j+1)*d)); every sub-vector is replaced by its nearest code (Euclidean
    distance) of one codebook shared by the heads, so that a position carries `num_heads` indices.

    Args:
        num_codes: codes in the codebook.
        embed_dim: channels of the features to quantize.
        num_heads: heads the features are split into.
        use_projection: pass the codebook through a learned `nn.Linear(d, d)` (codes = proj(embedding.weight)).
        beta: weight of the codebook term; the commitment term has weight 1, as in the original OptVQ.
        chunk_size: rows handled at a time by the nearest-code search (memory, not results).
    """

    def __init__(
        self,
        num_codes: int,
        embed_dim: int,
        num_heads: int = 1,
        use_projection: bool = True,
        beta: float = 0.25,
        chunk_size: int = 4096,
    ):
        super().__init__()
        if num_codes <= 0 or embed_dim <= 0 or num_heads <= 0:
            raise ValueError(
                f"num_codes, embed_dim and num_heads must be positive, got {num_codes}, {embed_dim}, {num_heads}"
            )
        if embed_dim % num_heads != 0:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.num_codes = num_codes
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.code_dim = embed_dim // num_heads
        self.beta = beta
        self.chunk_size = chunk_size
        self.use_projection = use_projection
        self.embedding = nn.Embedding(num_codes, self.code_dim)
        self.proj = nn.Linear(self.code_dim, self.code_dim) if use_projection else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's initialisation: codes ~ N(0, 1), projection weights ~ N(0, 1/d), PyTorch's default bias."""
        nn.init.normal_(self.embedding.weight)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=self.code_dim**-0.5)
            bound = 1.0 / math.sqrt(self.code_dim)
            nn.init.uniform_(self.proj.bias, -bound, bound)

    # -- codebook -------------------------------------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """The (num_codes, embed_dim / num_heads) codes the features are compared with, in float32."""
        weight = self.embedding.weight.float()
        if self.proj is None:
            return weight
        return nn.functional.linear(weight, self.proj.weight.float(), self.proj.bias.float())

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """
        Quantized features of `indices`: (B, num_heads, H, W) -> (B, embed_dim, H, W), or (B, T, num_heads) ->
        (B, T, embed_dim). The exact inverse of the assignment in `forward`.
        """
        if indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ValueError(f"indices must be an integer tensor, got dtype {indices.dtype}")
        if indices.ndim == 4 and indices.shape[1] != self.num_heads:
            raise ValueError(
                f"indices of shape (B, num_heads, H, W) need num_heads={self.num_heads} at dim 1, got "
                f"shape {tuple(indices.shape)}"
            )
        if indices.ndim == 3 and indices.shape[2] != self.num_heads:
            raise ValueError(
                f"indices of shape (B, T, num_heads) need num_heads={self.num_heads} at dim 2, got "
                f"shape {tuple(indices.shape)}"
            )
        if indices.ndim not in (3, 4):
            raise ValueError(
                f"indices must be (B, num_heads, H, W) or (B, T, num_heads), got shape {tuple(indices.shape)}"
            )
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(
                f"indices must lie in [0, {self.num_codes}), got values in "
                f"[{int(indices.min())}, {int(indices.max())}]"
            )
        codes = self.codebook()[indices.long()]  # (..., d)
        if indices.ndim == 4:  # (B, nH, H, W, d) -> (B, nH, d, H, W) -> (B, nH*d, H, W)
            batch, _, height, width, _ = codes.shape
            return codes.permute(0, 1, 4, 2, 3).reshape(batch, self.embed_dim, height, width)
        return codes.flatten(2)  # (B, T, nH, d) -> (B, T, nH*d)

    # -- assignment -----------------------------------------------------------------------------------------------
    def nearest_codes(self, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each row; chunked so that no (N, K) matrix is held."""
        out = torch.empty(rows.shape[0], dtype=torch.long, device=rows.device)
        for start in range(0, rows.shape[0], self.chunk_size):
            block = rows[start : start + self.chunk_size]
            out[start : start + self.chunk_size] = torch.cdist(block, codes).argmin(dim=1)
        return out

    def assign(self, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Index (N,) of the code each of the (N, d) rows is quantized to."""
        return self.nearest_codes(rows, codes)

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """
        Quantize `z` of shape (B, C, H, W) or (B, T, C) with C == embed_dim.

        Returns a `QuantizerOutput` whose `quantized` has the shape and dtype of `z` and straight-through gradients.
        """
        if z.ndim not in (3, 4):
            raise ValueError(f"expected features of shape (B, C, H, W) or (B, T, C), got shape {tuple(z.shape)}")
        channels = z.shape[1] if z.ndim == 4 else z.shape[2]
        if channels != self.embed_dim:
            raise ValueError(f"expected {self.embed_dim} feature channels, got {channels} (shape {tuple(z.shape)})")
        if not z.is_floating_point():
            raise ValueError(f"expected floating-point features, got dtype {z.dtype}")
        with torch.autocast(device_type=z.device.type, enabled=False):
            channels_last = z.permute(0, 2, 3, 1) if z.ndim == 4 else z
            rows = channels_last.float().reshape(-1, self.code_dim)  # position-major, heads adjacent
            codes = self.codebook()
            with torch.no_grad():
                flat_indices = self.assign(rows.detach(), codes.detach())
            selected = codes[flat_indices]
            loss = torch.mean((rows - selected.detach()) ** 2) + self.beta * torch.mean(
                (selected - rows.detach()) ** 2
            )
            # Straight-through: the value is exactly the code (z - sg[z] is exactly 0), the gradient flows to z.
            quantized_rows = selected.detach() + (rows - rows.detach())
        quantized = quantized_rows.reshape(channels_last.shape).to(z.dtype)
        indices = flat_indices.reshape(*channels_last.shape[:-1], self.num_heads)
        if z.ndim == 4:
            quantized = quantized.permute(0, 3, 1, 2)
            indices = indices.permute(0, 3, 1, 2)
        return QuantizerOutput(quantized=quantized.contiguous(), indices=indices.contiguous(), loss=loss)

    def extra_repr(self) -> str:
        return (
            f"num_codes={self.num_codes}, embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
            f"use_projection={self.use_projection}, beta={self.beta}"
        )


class SinkhornQuantizer(VectorQuantizer):
    """
    OptVQ's quantizer: assignment by entropy-regularised optimal transport.

    In training mode the rows of the whole batch (the union over all data-parallel ranks when torch.distributed is
    initialised) are assigned to the codes by the argmax of the Sinkhorn plan of their normalised distance matrix,
    which spreads the batch over the whole codebook. In eval mode the assignment is `inference_assignment`:
    `"nearest"` (default: the nearest code, so an image's tokens do not depend on the rest of its batch) or
    `"sinkhorn"` (the original's batch-level plan over the local batch, to reproduce its outputs). Eval mode never
    makes a collective call.

    Args:
        num_codes, embed_dim, num_heads, use_projection, beta, chunk_size: as in `VectorQuantizer`.
        epsilon: inverse temperature of the transport kernel exp(-epsilon * cost).
        iterations: Sinkhorn-Knopp iterations.
        cost_normalization: "all" (standardise the distance matrix by its global statistics), "dim" (divide by
            sqrt(d)) or "none".
        inference_assignment: "nearest" or "sinkhorn".
        streaming: how the Sinkhorn solver holds the (N, K) kernel: `False` keeps one (N, K) float32 matrix (fastest),
            `True` holds none and recomputes row tiles of `chunk_size` rows from the features on every pass (memory
            O(chunk_size x K); for very large codebooks), `None` (default) streams when the matrix would exceed
            `STREAMING_MIN_BYTES`. Same assignments either way.
    """

    def __init__(
        self,
        num_codes: int,
        embed_dim: int,
        num_heads: int = 1,
        epsilon: float = 10.0,
        iterations: int = 5,
        cost_normalization: str = "all",
        use_projection: bool = True,
        beta: float = 0.25,
        inference_assignment: str = "nearest",
        chunk_size: int = 4096,
        streaming: bool | None = None,
    ):
        super().__init__(
            num_codes, embed_dim, num_heads, use_projection=use_projection, beta=beta, chunk_size=chunk_size
        )
        if cost_normalization not in COST_NORMALIZATIONS:
            raise ValueError(f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {cost_normalization!r}")
        if inference_assignment not in INFERENCE_ASSIGNMENTS:
            raise ValueError(
                f"inference_assignment must be one of {INFERENCE_ASSIGNMENTS}, got {inference_assignment!r}"
            )
        if streaming not in (None, True, False):
            raise ValueError(f"streaming must be True, False or None (automatic), got {streaming!r}")
        if epsilon <= 0 or iterations <= 0:
            raise ValueError(f"epsilon and iterations must be positive, got {epsilon} and {iterations}")
        self.epsilon = float(epsilon)
        self.iterations = int(iterations)
        self.cost_normalization = cost_normalization
        self.inference_assignment = inference_assignment
        self.streaming = streaming

    def sinkhorn_codes(self, rows: torch.Tensor, codes: torch.Tensor, distributed: bool) -> torch.Tensor:
        """Index (N,) of the argmax of each row of the Sinkhorn plan of the rows' distances to the codes."""
        solver = _SinkhornSolver(
            self.epsilon, self.iterations, self.cost_normalization, self.chunk_size, distributed, self.streaming
        )
        return solver.assign(rows, codes)

    def assign(self, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.sinkhorn_codes(rows, codes, distributed=_distributed_group_active())
        if self.inference_assignment == "sinkhorn":
            return self.sinkhorn_codes(rows, codes, distributed=False)
        return self.nearest_codes(rows, codes)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, epsilon={self.epsilon}, iterations={self.iterations}, "
            f"cost_normalization={self.cost_normalization!r}, inference_assignment={self.inference_assignment!r}, "
            f"streaming={self.streaming}"
        )


__all__ = ["QuantizerOutput", "SinkhornQuantizer", "VectorQuantizer", "sinkhorn"]
