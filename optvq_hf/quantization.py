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

# Largest spread, in units of the log-kernel, between a row's best and worst code for which the kernel can be
# exponentiated once in float32: every entry is then >= exp(-50) ~ 2e-22, far above float32's smallest normal
# number (1.2e-38), so no entry underflows and scaling the kernel with row/column vectors is exact up to rounding.
# Beyond it the solver works in the log domain, which is exact for any spread but exponentiates on every pass.
EXP_DOMAIN_MAX_SPREAD = 50.0


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


class _SinkhornSolver:
    """
    Sinkhorn assignment of N rows to K codes from their (N, K) distance matrix, without any extra (N, K) matrix.

    The plan is P = diag(a) exp(-scale * D) diag(b); only the code-side scaling b matters for the argmax of a row, so
    the solver keeps the two scalings as vectors and never rescales the matrix. When `distributed` is set, the rows
    are the local share of a batch spread over the ranks of the default process group: the cost statistics, the row
    count and the column sums are reduced across ranks, so each rank gets exactly the assignment its rows would get if
    the whole batch were solved in one process.
    """

    def __init__(self, epsilon: float, iterations: int, normalization: str, chunk_size: int, distributed: bool):
        self.epsilon = float(epsilon)
        self.iterations = int(iterations)
        self.normalization = normalization
        self.chunk_size = int(chunk_size)
        self.distributed = distributed

    # -- statistics -----------------------------------------------------------------------------------------------
    def kernel_scale(self, distances: torch.Tensor, code_dim: int) -> float:
        """Factor s such that the log-kernel is -s * D up to per-row constants (which do not change the plan)."""
        if self.normalization == "dim":
            return self.epsilon / math.sqrt(code_dim)
        if self.normalization == "none":
            return self.epsilon
        # "all": D' = (D - mean) / (std + 1e-6) - min(...): the mean and the min are constant shifts, only std matters.
        return self.epsilon / (self.global_std(distances) + 1e-6)

    def global_std(self, distances: torch.Tensor) -> float:
        # Unbiased std in two float64 passes (mean, then squared deviations) over the rows of every rank; the same
        # arithmetic in one process, so that a batch split over ranks gets the scale the whole batch gets.
        count = torch.tensor([float(distances.numel())], dtype=torch.float64, device=distances.device)
        total = distances.sum(dtype=torch.float64).reshape(1)
        if self.distributed:
            _all_reduce(count)
            _all_reduce(total)
        mean = (total / count).float()
        squares = torch.zeros(1, dtype=torch.float64, device=distances.device)
        for start in range(0, distances.shape[0], self.chunk_size):  # chunks: no (N, K) temporary
            squares += (distances[start : start + self.chunk_size] - mean).square_().sum(dtype=torch.float64)
        if self.distributed:
            _all_reduce(squares)
        return math.sqrt(squares.item() / max(count.item() - 1.0, 1.0))

    def total_rows(self, num_rows: int, device: torch.device) -> int:
        if not self.distributed:
            return num_rows
        count = torch.tensor([num_rows], dtype=torch.float64, device=device)
        return int(_all_reduce(count).item())

    def global_max(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            _all_reduce(values, dist.ReduceOp.MAX)
        return values

    # -- assignment -----------------------------------------------------------------------------------------------
    def assign(self, distances: torch.Tensor, code_dim: int) -> torch.Tensor:
        """Indices (N,) of the argmax of each row of the plan. Overwrites `distances`."""
        scale = self.kernel_scale(distances, code_dim)
        row_min, row_max = torch.aminmax(distances, dim=1)
        spread = self.global_max(((row_max - row_min).max() * scale).reshape(1).double()).item()
        # In place: the log-kernel, each row shifted so that its best entry is 0. The row potentials start at minus
        # the shift, so the iterations are exactly those of the unshifted kernel from uniform row weights.
        log_kernel = distances.sub_(row_min[:, None]).mul_(-scale)
        initial_row_potential = row_min * -scale
        if spread <= EXP_DOMAIN_MAX_SPREAD:
            return self._assign_exp_domain(log_kernel.exp_(), initial_row_potential.double())
        return self._assign_log_domain(log_kernel.clamp_(min=-1e30), initial_row_potential)

    def _assign_exp_domain(self, kernel: torch.Tensor, log_row: torch.Tensor) -> torch.Tensor:
        # Scalings are kept as float64 logs and applied as float32 vectors normalised to a maximum of 1. Each
        # matrix-vector product is then >= exp(-EXP_DOMAIN_MAX_SPREAD) (the term of the largest weight), while a term
        # lost to underflow is < 1.2e-38: the products are exact up to float32 rounding.
        num_rows, num_codes = kernel.shape
        total_rows = self.total_rows(num_rows, kernel.device)
        log_code = torch.zeros(num_codes, dtype=torch.float64, device=kernel.device)
        for _ in range(self.iterations):
            row_offset = self.global_max(log_row.max().reshape(1))
            column_mass = kernel.T @ (log_row - row_offset).exp().float()
            if self.distributed:
                _all_reduce(column_mass)
            log_code = -math.log(num_codes) - column_mass.double().log() - row_offset
            code_offset = log_code.max()
            row_mass = kernel @ (log_code - code_offset).exp().float()
            log_row = -math.log(total_rows) - row_mass.double().log() - code_offset
        code_weights = (log_code - log_code.max()).exp().float()
        return self._chunked_argmax(kernel, lambda block: block * code_weights)

    def _assign_log_domain(self, log_kernel: torch.Tensor, row_potential: torch.Tensor) -> torch.Tensor:
        num_rows, num_codes = log_kernel.shape
        total_rows = self.total_rows(num_rows, log_kernel.device)
        code_potential = torch.zeros(num_codes, dtype=log_kernel.dtype, device=log_kernel.device)
        for _ in range(self.iterations):
            code_potential = -math.log(num_codes) - self._column_logsumexp(log_kernel, row_potential)
            row_potential = -math.log(total_rows) - self._row_logsumexp(log_kernel, code_potential)
        return self._chunked_argmax(log_kernel, lambda block: block + code_potential)

    def _column_logsumexp(self, log_kernel: torch.Tensor, row_potential: torch.Tensor) -> torch.Tensor:
        # Streaming logsumexp over row chunks (and ranks): running maximum and sum of exponentials per column.
        running_max = torch.full((log_kernel.shape[1],), -math.inf, dtype=log_kernel.dtype, device=log_kernel.device)
        running_sum = torch.zeros_like(running_max)
        for start in range(0, log_kernel.shape[0], self.chunk_size):
            block = log_kernel[start : start + self.chunk_size] + row_potential[start : start + self.chunk_size, None]
            block_max = block.amax(dim=0)
            new_max = torch.maximum(running_max, block_max)
            running_sum = running_sum * (running_max - new_max).exp() + block.sub_(new_max).exp_().sum(dim=0)
            running_max = new_max
        if self.distributed:
            global_max = self.global_max(running_max.clone())
            running_sum = _all_reduce(running_sum * (running_max - global_max).exp())
            running_max = global_max
        return running_max + running_sum.log()

    def _row_logsumexp(self, log_kernel: torch.Tensor, code_potential: torch.Tensor) -> torch.Tensor:
        out = torch.empty(log_kernel.shape[0], dtype=log_kernel.dtype, device=log_kernel.device)
        for start in range(0, log_kernel.shape[0], self.chunk_size):
            block = log_kernel[start : start + self.chunk_size] + code_potential
            out[start : start + self.chunk_size] = torch.logsumexp(block, dim=1)
        return out

    def _chunked_argmax(self, matrix: torch.Tensor, transform) -> torch.Tensor:
        out = torch.empty(matrix.shape[0], dtype=torch.long, device=matrix.device)
        for start in range(0, matrix.shape[0], self.chunk_size):
            out[start : start + self.chunk_size] = transform(matrix[start : start + self.chunk_size]).argmax(dim=1)
        return out


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
            raise ValueError(f"indices of shape (B, num_heads, H, W) need num_heads={self.num_heads} at dim 1, got "
                             f"shape {tuple(indices.shape)}")
        if indices.ndim == 3 and indices.shape[2] != self.num_heads:
            raise ValueError(f"indices of shape (B, T, num_heads) need num_heads={self.num_heads} at dim 2, got "
                             f"shape {tuple(indices.shape)}")
        if indices.ndim not in (3, 4):
            raise ValueError(f"indices must be (B, num_heads, H, W) or (B, T, num_heads), got shape "
                             f"{tuple(indices.shape)}")
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_codes):
            raise ValueError(f"indices must lie in [0, {self.num_codes}), got values in "
                             f"[{int(indices.min())}, {int(indices.max())}]")
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
            loss = torch.mean((rows - selected.detach()) ** 2) + self.beta * torch.mean((selected - rows.detach()) ** 2)
            # Straight-through: the value is exactly the code (z - sg[z] is exactly 0), the gradient flows to z.
            quantized_rows = selected.detach() + (rows - rows.detach())
        quantized = quantized_rows.reshape(channels_last.shape).to(z.dtype)
        indices = flat_indices.reshape(*channels_last.shape[:-1], self.num_heads)
        if z.ndim == 4:
            quantized = quantized.permute(0, 3, 1, 2)
            indices = indices.permute(0, 3, 1, 2)
        return QuantizerOutput(quantized=quantized.contiguous(), indices=indices.contiguous(), loss=loss)

    def extra_repr(self) -> str:
        return (f"num_codes={self.num_codes}, embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
                f"use_projection={self.use_projection}, beta={self.beta}")


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
    ):
        super().__init__(num_codes, embed_dim, num_heads, use_projection=use_projection, beta=beta,
                         chunk_size=chunk_size)
        if cost_normalization not in COST_NORMALIZATIONS:
            raise ValueError(f"cost_normalization must be one of {COST_NORMALIZATIONS}, got {cost_normalization!r}")
        if inference_assignment not in INFERENCE_ASSIGNMENTS:
            raise ValueError(
                f"inference_assignment must be one of {INFERENCE_ASSIGNMENTS}, got {inference_assignment!r}"
            )
        if epsilon <= 0 or iterations <= 0:
            raise ValueError(f"epsilon and iterations must be positive, got {epsilon} and {iterations}")
        self.epsilon = float(epsilon)
        self.iterations = int(iterations)
        self.cost_normalization = cost_normalization
        self.inference_assignment = inference_assignment

    def sinkhorn_codes(self, rows: torch.Tensor, codes: torch.Tensor, distributed: bool) -> torch.Tensor:
        """Index (N,) of the argmax of each row of the Sinkhorn plan of the rows' distances to the codes."""
        solver = _SinkhornSolver(self.epsilon, self.iterations, self.cost_normalization, self.chunk_size, distributed)
        return solver.assign(torch.cdist(rows, codes), self.code_dim)

    def assign(self, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.sinkhorn_codes(rows, codes, distributed=_distributed_group_active())
        if self.inference_assignment == "sinkhorn":
            return self.sinkhorn_codes(rows, codes, distributed=False)
        return self.nearest_codes(rows, codes)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, epsilon={self.epsilon}, iterations={self.iterations}, "
                f"cost_normalization={self.cost_normalization!r}, inference_assignment={self.inference_assignment!r}")


__all__ = ["QuantizerOutput", "SinkhornQuantizer", "VectorQuantizer", "sinkhorn"]
