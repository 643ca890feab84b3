"""How features are assigned to codes: the nearest code, and OptVQ's Sinkhorn-Knopp transport plan.

Plain functions on (N, d) rows and (K, d) codes, used by the quantizer modules of `quantization.py`; no parameters.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import mmap
import sys
import threading

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


# ---------------------------------------------------------------------------------------------------------------------
# The exp-domain solver: the default in eager mode
# ---------------------------------------------------------------------------------------------------------------------
# Log-kernel entries below _LOG_FLOOR are clamped to it before exponentiation, so every kernel entry is a normal
# float32 number (exponentials with subnormal results are slower on CPU). A float32 product of a kernel entry and
# a weight in [0, 1] then misstates its term by less than 2^-125 (a clamped entry, an underflowing product), and in no
# other way beyond rounding. A guarded mass is trusted when all its terms together cannot misstate it by more than
# 2^-30 of (mass + guard), far below float32 rounding; a row's argmax is trusted when its winning product is far above
# anything an underflow can produce. When anything is not trusted, the batch is solved again in the log domain.
_LOG_FLOOR = -87.0
# The kernel is exponentiated in base 2 (E = 2^(A / ln 2), the factor folded into the one operation that makes the
# exponent): PyTorch's vectorised exp2 takes a fraction of its exp's time on CPU (`benchmarks/quantizer.py
# --elementwise`) at the same 1-ULP accuracy, and the relative rounding of E is the same (log2 e times the exponent,
# times ln 2 in the result).
_LOG2_E = 1.0 / math.log(2.0)
_LOG2_FLOOR = _LOG_FLOOR * _LOG2_E
_LOG_LOST_TERM = -125 * math.log(2.0)
_LOG_TRUSTED_SHARE = -30 * math.log(2.0)
_ARGMAX_FLOOR = 2.0**-100

# On CPU the elementwise work runs on row tiles of at most this many entries (4 MiB), which stay in the cache across
# the several operations on a tile; a GPU takes tiles of `chunk_size` rows.
CPU_TILE_ENTRIES = 2**20
GPU_TILE_ENTRIES = 2**26


# Linux's madvise(MADV_HUGEPAGE): asks for 2 MiB pages for a memory range. Its value is fixed by the kernel ABI.
_MADV_HUGEPAGE = 14
# Matrices at least this large are given huge pages on CPU.
_HUGE_PAGE_MIN_BYTES = 32 * 2**20
_libc = None


def _advise_huge_pages(matrix: torch.Tensor) -> None:
    """
    Ask Linux to back a fresh CPU matrix with transparent huge pages before anything is written to it. The kernel
    matrix is allocated anew on every call (PyTorch's CPU allocator caches nothing), and writing it the first time
    takes one page fault per 4 KiB page, about as long as the GEMM that writes it; with 2 MiB pages that cost
    disappears. Only advice: where the system does not honour it (THP disabled, another OS), nothing changes.
    """
    global _libc
    if not sys.platform.startswith("linux") or matrix.device.type != "cpu":
        return
    size = matrix.numel() * matrix.element_size()
    if size < _HUGE_PAGE_MIN_BYTES:
        return
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        page = mmap.PAGESIZE
        start = -(-matrix.data_ptr() // page) * page  # madvise needs a page-aligned start
        length = (matrix.data_ptr() + size - start) // page * page
        _libc.madvise(start, length, _MADV_HUGEPAGE)  # a failure (return -1) leaves the usual pages
    except (OSError, AttributeError):
        pass


def _new_matrix(entries: int, like: torch.Tensor) -> torch.Tensor:
    """Uninitialised flat storage for a kernel matrix, advised huge pages on CPU."""
    matrix = like.new_empty(entries)
    _advise_huge_pages(matrix)
    return matrix


class KernelWorkspace:
    """
    Memory for the exp-domain solver's (N, K) kernel matrix, kept from one call to the next on CPU.

    PyTorch's CPU allocator keeps nothing: each call would map a fresh matrix, and the operating system hands every
    page over zeroed, at its first write: a page fault per page, and more where a hypervisor has taken back freed
    memory in the meantime (`benchmarks/quantizer.py` times the solver with and without). A GPU's caching allocator
    already keeps freed memory, so there this holds nothing. The buffer grows to the largest matrix asked for and
    stays until `clear()` or until its owner (the quantizer) is freed; copies and pickles of the owner start without
    it. A call made while another thread uses the buffer gets a matrix of its own.
    """

    def __init__(self):
        self._buffer: torch.Tensor | None = None
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        """Bytes held between calls."""
        return 0 if self._buffer is None else self._buffer.numel() * self._buffer.element_size()

    def clear(self) -> None:
        self._buffer = None

    @contextlib.contextmanager
    def matrix(self, num_rows: int, num_codes: int, like: torch.Tensor):
        """A (num_rows, num_codes) matrix of `like`'s dtype and device, its values undefined."""
        if like.device.type != "cpu" or not self._lock.acquire(blocking=False):
            yield _new_matrix(num_rows * num_codes, like).view(num_rows, num_codes)
            return
        try:
            size = num_rows * num_codes
            if self._buffer is None or self._buffer.numel() < size or self._buffer.dtype != like.dtype:
                self._buffer = None  # freed before the larger one is made
                self._buffer = _new_matrix(size, like)
            yield self._buffer[:size].view(num_rows, num_codes)
        finally:
            self._lock.release()

    def __deepcopy__(self, memo):
        return KernelWorkspace()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()


# The row argmax (argmin) by blocks of this many codes: the block maxima (a vectorised max), the argmax over them,
# then the argmax inside the winning block; about 3x faster on CPU than torch.argmax over the whole row, and the same
# index (the first block holding the row's maximum holds its first occurrence).
_ARGMAX_BLOCK = 64


def _row_extreme(tile: torch.Tensor, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, values) of each row's maximum (`largest`) or minimum of a 2-D tile: the indices of torch.argmax
    (torch.argmin), ties to the first occurrence."""
    num_rows, num_codes = tile.shape
    arg, extreme = (torch.argmax, torch.amax) if largest else (torch.argmin, torch.amin)
    if num_codes % _ARGMAX_BLOCK or num_codes == _ARGMAX_BLOCK or not num_rows:
        indices = arg(tile, dim=1)
        return indices, tile.gather(1, indices[:, None])[:, 0]
    blocks = tile.view(num_rows, num_codes // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
    best_block = arg(extreme(blocks, 2), dim=1)
    winners = blocks.gather(1, best_block[:, None, None].expand(num_rows, 1, _ARGMAX_BLOCK))[:, 0]
    inside = arg(winners, dim=1)
    return best_block * _ARGMAX_BLOCK + inside, winners.gather(1, inside[:, None])[:, 0]


class _Distances:
    """
    Euclidean distances by row tiles with `torch.cdist`'s own arithmetic (one product of the rows and codes augmented
    with their squared norms, then clamp and sqrt), written into a given buffer: the values of `torch.cdist` whatever
    the tiling (tested), without its (N, K) temporaries.
    """

    def __init__(self, rows: torch.Tensor, codes: torch.Tensor):
        self.rows = torch.cat([rows.mul(-2), rows.pow(2).sum(-1, keepdim=True), rows.new_ones(rows.shape[0], 1)], 1)
        self.codes = torch.cat([codes, codes.new_ones(codes.shape[0], 1), codes.pow(2).sum(-1, keepdim=True)], 1)

    def product(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """The squared distances of rows [start, stop), unclamped (`finish` makes them distances)."""
        return torch.matmul(self.rows[start:stop], self.codes.T, out=out)

    @staticmethod
    def finish(squared: torch.Tensor) -> torch.Tensor:
        return squared.clamp_min_(1e-30).sqrt_()

    def tile(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        return self.finish(self.product(start, stop, out))


# The variance of the distances comes from their sum (a row sum per tile) and the sum of their squares in closed form
# from the features, sum_ik |x_i - c_k|^2 = K sum_i |x_i|^2 + N sum_k |c_k|^2 - 2 (sum_i x_i).(sum_k c_k), in float64:
# no pass over the matrix. Its rounding error, a few 1e-9 of the mean square, is multiplied in the variance by the
# mean square over the variance; the variance is trusted while that ratio is at most _VARIANCE_MAX_AMPLIFICATION (an
# error of a few 1e-6 at most, that of a float32 two-pass variance; about 1e-7 for distances like a model's, where
# the ratio is near 130). Distances too alike for that send the batch to the log-domain solver.
_VARIANCE_MAX_AMPLIFICATION = 1024.0


def _distance_statistics(tiles, rows, codes, distributed: bool):
    """
    One pass over the distance tiles: the row minima r_i, the code shifts b_k = min_i (D_ik - r_i), the minimum of
    all distances of all ranks, their unbiased standard deviation (float32) and whether that is trusted (0-d bool).
    Each tile is left holding D_ik - r_i.
    """
    num_rows, num_codes = rows.shape[0], codes.shape[0]
    row_min, row_sums = rows.new_empty(num_rows), rows.new_empty(num_rows)
    code_shift = rows.new_full((num_codes,), math.inf)
    for start, stop, tile in tiles:
        torch.sum(tile, dim=1, out=row_sums[start:stop])
        torch.amin(tile, dim=1, out=row_min[start:stop])
        torch.minimum(code_shift, tile.sub_(row_min[start:stop, None]).amin(dim=0), out=code_shift)
    features, code_vectors = rows.double(), codes.double()
    squares = (
        num_codes * features.pow(2).sum()
        + num_rows * code_vectors.pow(2).sum()
        - 2 * features.sum(0).dot(code_vectors.sum(0))
    )
    totals = torch.stack([squares.new_tensor(num_rows * num_codes), row_sums.double().sum(), squares])
    minimum = row_min.min() if num_rows else rows.new_tensor(math.inf)
    if distributed:
        _all_reduce(totals)
        extremes = _all_reduce(torch.cat([minimum.reshape(1), code_shift]), dist.ReduceOp.MIN)
        minimum, code_shift = extremes[0], extremes[1:]
    count, total, squares = totals.unbind()
    mean_square = squares / count.clamp_min(1)
    variance = ((squares - total * total / count.clamp_min(1)) / (count - 1).clamp_min(1)).clamp_min(0)
    trusted = variance * _VARIANCE_MAX_AMPLIFICATION >= mean_square
    return row_min, code_shift, minimum, variance.sqrt().float(), trusted


def _exp_domain_indices(
    rows, codes, epsilon, iterations, normalization, tile_rows, distributed, streaming, matrix=None
):
    """
    The original's guarded iterations, each half-step one float32 matrix-vector product over the kernel.

    With the log-kernel A = -s * D + s * m (s the scale of the normalisation, m = min D for "all", else 0), the
    kernel is stored shifted, E_ik = exp(-s * (D_ik - r_i - b_k)) <= 1 (row minima r, code shifts b: every row and
    every column has an entry 1, which keeps as many entries as possible inside float32's range), made once; the
    shifts go into float64 log-potentials, the plan being Q_ik = E_ik exp(f_i + g_k). A code's mass is exp(g_k + F)
    sum_i E_ik exp(f_i - F) (F = max f), a row's likewise, and the guard enters as log(mass + guard) =
    logaddexp(log mass, log guard), as in `_sinkhorn_indices`.

    `matrix`: where to keep the (N, K) kernel unless streaming (default: a new matrix).

    Returns the indices and a 0-d bool tensor saying whether every mass and every argmax was trusted (the certificate
    above). Nothing waits on the host.
    """
    device = rows.device
    num_rows, num_codes = rows.shape[0], codes.shape[0]
    log_guard = math.log(GUARD)
    distances = _Distances(rows, codes)
    ranges = [(start, min(start + tile_rows, num_rows)) for start in range(0, num_rows, tile_rows)]
    if streaming:
        matrix = None
    elif matrix is None:
        matrix = _new_matrix(num_rows * num_codes, rows).view(num_rows, num_codes)
    scratch = rows.new_empty(max(1, min(tile_rows, num_rows)), num_codes)

    def distance_tiles():
        if not streaming:  # one matrix product (fastest), finished tile by tile
            distances.product(0, num_rows, matrix)
        for start, stop in ranges:
            if streaming:
                yield start, stop, distances.tile(start, stop, scratch[: stop - start])
            else:
                yield start, stop, distances.finish(matrix[start:stop])

    row_min, code_shift, minimum, std, std_trusted = _distance_statistics(distance_tiles(), rows, codes, distributed)
    scale = torch.tensor(float(epsilon), device=device)
    if normalization == "dim":
        scale = scale / math.sqrt(codes.shape[1])
    elif normalization == "all":  # D' = (D - mean) / (std + 1e-6) - min(...) = (D - min D) / (std + 1e-6)
        scale = scale / (std + 1e-6)
    negative_scale = -scale
    # the exponent of the kernel in base 2: -s * log2(e) * (D - r - b)
    negative_scale2 = negative_scale * _LOG2_E
    scaled_shift2 = code_shift * (scale * _LOG2_E)
    reference = minimum if normalization == "all" else torch.zeros_like(minimum)
    row_shift = (row_min - reference).double() * negative_scale.double()  # A_ik = log E_ik + row_shift_i + code_i
    code = code_shift.double() * negative_scale.double()

    def kernel_tiles(make: bool = False):
        """The kernel: made tile by tile on the first pass (`make`), then the whole matrix as one tile (one
        matrix-vector product per half-step: fewest operations); streaming, every pass remakes each tile from the
        features, so a row half-step and the next column sums share one pass."""
        if not streaming and not make:
            yield 0, num_rows, matrix
            return
        for start, stop in ranges:
            tile = scratch[: stop - start] if streaming else matrix[start:stop]  # holds D - r once made
            if streaming:
                distances.tile(start, stop, tile).sub_(row_min[start:stop, None])
            # -s * log2(e) * (D - r - b) in one operation: s' * b + (D - r) * (-s')
            torch.addcmul(scaled_shift2, tile, negative_scale2, out=tile)
            yield start, stop, tile.clamp_(min=_LOG2_FLOOR).exp2_()

    total_rows = torch.tensor(float(num_rows), dtype=torch.float64, device=device)
    if distributed:
        _all_reduce(total_rows)
    log_rows, log_codes = total_rows.log(), math.log(num_codes)
    untrusted = ~std_trusted if normalization == "all" else torch.zeros((), dtype=torch.bool, device=device)

    def largest(values: torch.Tensor) -> torch.Tensor:
        local = values.max() if values.numel() else values.new_tensor(-math.inf)
        return _all_reduce(local.reshape(1).clone(), dist.ReduceOp.MAX)[0] if distributed else local

    def shifted_column_sums(log_sums, top, tile_sums, tile_top):
        """Adds a tile's column sums (float32, their rows' weights shifted by `tile_top`) to `log_sums`, the log of
        the float64 sums so far, shifted by `top`; returns both anew (a running log-sum-exp, no host read)."""
        new_top = torch.maximum(top, tile_top)
        added = tile_sums.double().mul_((tile_top - new_top).exp())
        return torch.logaddexp(log_sums + (top - new_top), added.log()), new_top

    def all_ranks(log_sums, top):
        """Column sums of this rank's rows -> of the rows of all ranks, shifted by the largest row potential."""
        if not distributed:
            return log_sums, top
        global_top = largest(top)
        sums = _all_reduce((log_sums + (top - global_top)).exp())
        return sums.log(), global_top

    def guarded_update(potential, log_scale, log_sum, log_terms, log_count):
        """potential - log(mass + guard) - log(count), mass = exp(log_scale) * (a float32 sum of exp(log_terms)
        products, whose log is `log_sum`); flags the masses that underflow could misstate."""
        nonlocal untrusted
        guarded = _guarded_log(log_scale + log_sum, log_guard)
        untrusted |= (log_scale + log_terms + _LOG_LOST_TERM > guarded + _LOG_TRUSTED_SHARE).any()
        return potential - guarded - log_count

    def column_pass(row_potential):
        """The first pass: makes the kernel and sums its columns, weighted by exp(f_i - F), F = max f (all ranks)."""
        top = largest(row_potential)
        weights = (row_potential - top).exp().float()
        sums = torch.zeros(num_codes, dtype=torch.float64, device=device)
        for start, stop, tile in kernel_tiles(make=True):
            sums += torch.mv(tile.T, weights[start:stop])
        if distributed:
            _all_reduce(sums)
        return sums.log(), top

    def row_then_column_pass(row, code):
        """A row half-step and the next code half-step's column sums in one pass over the kernel: each tile's rows
        are scaled, then the same tile (still in the cache when streamed) sums its columns with the new weights."""
        code_top = largest(code)
        code_weights = (code - code_top).exp().float()
        new_row = torch.empty_like(row)
        log_sums = torch.full((num_codes,), -math.inf, dtype=torch.float64, device=device)
        top = torch.full((), -math.inf, dtype=torch.float64, device=device)
        for start, stop, tile in kernel_tiles():
            old = row[start:stop]
            row_sums = torch.mv(tile, code_weights).double()
            potential = guarded_update(old, old + code_top, row_sums.log(), log_codes, log_rows)
            new_row[start:stop] = potential
            tile_top = potential.max()
            tile_sums = torch.mv(tile.T, (potential - tile_top).exp().float())
            log_sums, top = shifted_column_sums(log_sums, top, tile_sums, tile_top)
        return new_row, *all_ranks(log_sums, top)

    # The first pass makes the kernel and, from the uniform start f_i = -log(T + guard) + row_shift_i, sums the
    # columns; they give the total mass T itself (always trusted: its largest term is exp(max A) times 1).
    log_columns, top = column_pass(row_shift)
    start_potential = -_guarded_log(torch.logsumexp(log_columns + code, 0) + top, log_guard)
    row, row_top = row_shift + start_potential, top + start_potential
    for iteration in range(iterations):
        if iteration > 0:
            row, log_columns, row_top = row_then_column_pass(row, code)
        code = guarded_update(code, code + row_top, log_columns, log_rows, log_codes)
    code_weights = (code - largest(code)).exp().float()
    indices = torch.empty(num_rows, dtype=torch.long, device=device)
    # The argmax by cache-sized tiles, also when materialised: each tile scaled into the scratch tile, so the kernel
    # matrix, read for the last time, is not written back to memory.
    tiles = kernel_tiles(make=True) if streaming else ((s, e, matrix[s:e]) for s, e in ranges)
    for start, stop, tile in tiles:
        winners, maxima = _row_extreme(torch.mul(tile, code_weights, out=scratch[: stop - start]))
        indices[start:stop] = winners
        untrusted |= (maxima < _ARGMAX_FLOOR).any()
    return indices, ~untrusted


def _tile_rows(num_codes: int, chunk_size: int, device: torch.device) -> int:
    """Rows per tile: at most `chunk_size`; on CPU few enough that a tile stays in the cache (CPU_TILE_ENTRIES), on a
    GPU few enough to bound the memory beyond the (N, K) matrix (GPU_TILE_ENTRIES)."""
    entries = min(CPU_TILE_ENTRIES, TILE_ENTRIES) if device.type == "cpu" else GPU_TILE_ENTRIES
    return max(1, min(chunk_size, entries // num_codes))


# The nearest-code search's cost is its GEMM; split among the CPU threads, a tile of few rows gives each thread a GEMM
# too thin to run near the speed of one large one (cache-sized tiles of 16,384 codes have 64 rows).
_GEMM_ROWS_PER_THREAD = 64


def nearest_codes(rows: torch.Tensor, codes: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """
    Index (N,) of the nearest code of each row (Euclidean): argmin_k ||c_k||^2 - 2 r.c_k, the squared distance less
    the row's own norm (same argmin; no sqrt or clamp over the (N, K) matrix), by row tiles written into one reused
    buffer (at most `chunk_size` rows; on CPU, cache-sized, and at least 64 rows per thread), the argmin by blocks
    (`_row_extreme`).
    """
    num_rows, num_codes = rows.shape[0], codes.shape[0]
    out = torch.empty(num_rows, dtype=torch.long, device=rows.device)
    if num_rows == 0:
        return out
    tile_rows = _tile_rows(num_codes, chunk_size, rows.device)
    # Each thread's share of a tile's GEMM at least _GEMM_ROWS_PER_THREAD rows; not when traced, where the thread
    # count, a host value, cannot enter a graph (and the compiler chooses its own tiling).
    if rows.device.type == "cpu" and not traced():
        tile_rows = max(tile_rows, min(chunk_size, _GEMM_ROWS_PER_THREAD * torch.get_num_threads()))
    tile_rows = min(tile_rows, num_rows)
    code_norms, codes_t = codes.pow(2).sum(1), codes.T
    buffer = rows.new_empty(tile_rows, num_codes)
    for start in range(0, num_rows, tile_rows):
        stop = min(start + tile_rows, num_rows)
        scores = torch.addmm(code_norms, rows[start:stop], codes_t, alpha=-2, out=buffer[: stop - start])
        out[start:stop] = _row_extreme(scores, largest=False)[0]
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
    workspace: KernelWorkspace | None = None,
) -> torch.Tensor:
    """
    Index (N,) of the argmax of each row of the original's Sinkhorn plan of the rows' normalised distances to the
    codes, its `+1e-8` guards included (see `_sinkhorn_indices`); with `distributed`, the plan (and the cost
    statistics) are over the rows of all ranks.

    The guard is an absolute mass, not a relative one: the plan is not invariant to rescaling the kernel, and with
    16,384 codes most codes start with a mass far below 1e-8, so the guard caps how much they are scaled up. It is
    part of the algorithm (dropping it changes 2-4% of the indices at the paper's sizes).

    Solver: in eager mode the exp domain (`_exp_domain_indices`: the kernel exponentiated once, one matrix-vector
    product per half-step), whose underflow certificate sends a batch it cannot vouch for to the exact log-domain
    solver (`_sinkhorn_indices`); under torch.compile / export / tracing the log-domain solver alone. Same indices.

    Memory: one (N, K) float32 matrix (the kernel) plus one tile; with `streaming` (or automatically above
    `STREAMING_MIN_BYTES`) no (N, K) matrix: each tile is recomputed from the features on every pass (one pass
    per iteration). `workspace` keeps the matrix's memory from one call to the next (`KernelWorkspace`).
    """
    if cost_normalization not in COST_NORMALIZATIONS:
        raise ValueError(f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {cost_normalization!r}")
    num_rows, num_codes = rows.shape[0], codes.shape[0]
    if num_rows == 0 and not distributed:
        return torch.empty(0, dtype=torch.long, device=rows.device)
    if streaming is None:
        streaming = num_rows * num_codes * 4 > STREAMING_MIN_BYTES
    streaming, iterations = bool(streaming), int(iterations)
    if not traced():
        tile_rows = _tile_rows(num_codes, chunk_size, rows.device)
        keep = workspace is not None and not streaming
        with workspace.matrix(num_rows, num_codes, rows) if keep else contextlib.nullcontext() as matrix:
            indices, trusted = _exp_domain_indices(
                rows, codes, epsilon, iterations, cost_normalization, tile_rows, distributed, streaming, matrix
            )
        if distributed:  # every rank takes the same path
            trusted = _all_reduce(trusted.to(torch.int32).reshape(1), dist.ReduceOp.MIN)[0]
        if bool(trusted):  # the solver's one host synchronisation, after its iterations
            return indices
    kernel = _LogKernel(rows, codes, epsilon, cost_normalization, chunk_size, distributed, streaming)
    return _sinkhorn_indices(kernel, num_codes, iterations, distributed, rows.device)


def traced() -> bool:
    """Whether torch.compile, torch.export or torch.jit.trace is capturing the code: none of them can capture reading a
    tensor's value on the host (data-dependent control flow, such as the exp domain's fallback or a value check)."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def distributed_group_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
