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
from torch import nn
from transformers.utils import ModelOutput

from .assignment import (
    COST_NORMALIZATIONS,
    KernelWorkspace,
    distributed_group_active,
    nearest_codes,
    sinkhorn,
    sinkhorn_codes,
    traced,
)

INFERENCE_ASSIGNMENTS = ("nearest", "sinkhorn")


def checks_tensor_values() -> bool:
    """Whether input checks that read tensor values (NaN, range, index bounds) may run: in eager mode only.

    Reading a value is a host synchronisation and data-dependent control flow, which `torch.compile(fullgraph=True)`,
    `torch.export` and `torch.jit.trace` cannot capture (the trace would bake the check in as a constant). Shape and
    dtype checks cost nothing and run everywhere.
    """
    return not traced()


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether no entry is NaN or +-Inf (a host read): `torch.isfinite(tensor).all()`, from one min-max pass, which
    propagates NaN (about ten times faster on CPU than the boolean tensor of `isfinite`)."""
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


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
        # Created float32 whatever the default dtype (a half default dtype, `from_config(dtype=...)`): the codebook and
        # the assignment must not be stored or trained in half precision.
        self.embedding = nn.Embedding(num_codes, self.code_dim, dtype=torch.float32)
        self.proj = nn.Linear(self.code_dim, self.code_dim, dtype=torch.float32) if use_projection else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The original's initialisation: codes ~ N(0, 1), projection weights ~ N(0, 1/d), PyTorch's default bias."""
        nn.init.normal_(self.embedding.weight)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=self.code_dim**-0.5)
            bound = 1.0 / math.sqrt(self.code_dim)
            nn.init.uniform_(self.proj.bias, -bound, bound)

    # -- codebook -------------------------------------------------------------------------------------------------
    def codebook(self, device: torch.device | None = None) -> torch.Tensor:
        """The (num_codes, embed_dim / num_heads) codes the features are compared with, in float32.

        The parameters are used through the submodules' calls, never read directly, so that accelerate's offload hooks
        bring offloaded weights in. `device` is where the result is used (that of the features).
        """
        if device is None:
            device = self.embedding.weight.device
        with torch.autocast(device_type=torch.device(device).type, enabled=False):
            weight = self.embedding(torch.arange(self.num_codes, device=device)).float()
            if self.proj is None:
                return weight
            return self.proj(weight).float()

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
        if checks_tensor_values() and indices.numel():
            low, high = (int(v) for v in torch.aminmax(indices.long()))
            if low < 0 or high >= self.num_codes:
                raise ValueError(f"indices must lie in [0, {self.num_codes}), got values in [{low}, {high}]")
        codes = self.codebook(indices.device)
        codes = nn.functional.embedding(indices.long().to(codes.device), codes)  # (..., d)
        if indices.ndim == 4:  # (B, nH, H, W, d) -> (B, nH, d, H, W) -> (B, nH*d, H, W)
            batch, _, height, width, _ = codes.shape
            return codes.permute(0, 1, 4, 2, 3).reshape(batch, self.embed_dim, height, width)
        return codes.flatten(2)  # (B, T, nH, d) -> (B, T, nH*d)

    # -- assignment -----------------------------------------------------------------------------------------------
    def assign(self, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Index (N,) of the code each of the (N, d) rows is quantized to."""
        return nearest_codes(rows, codes, self.chunk_size)

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
        if z.numel() == 0:
            raise ValueError(f"expected a non-empty batch of features, got shape {tuple(z.shape)}")
        # A NaN / Inf row has no nearest code: assignment would silently pick index 0 or an arbitrary one. The check
        # synchronises with the device, so it runs in eager mode only (compile, tracing and export skip it).
        if checks_tensor_values() and not all_finite(z):
            raise ValueError(
                "the quantizer got non-finite features (NaN or Inf): check the encoder's input for NaN / Inf pixels "
                "and the weights for NaN (e.g. a diverged training run)"
            )
        with torch.autocast(device_type=z.device.type, enabled=False):
            channels_last = z.permute(0, 2, 3, 1) if z.ndim == 4 else z
            rows = channels_last.float().reshape(-1, self.code_dim)  # position-major, heads adjacent
            codes = self.codebook(z.device)
            with torch.no_grad():
                flat_indices = self.assign(rows.detach(), codes.detach())
            # F.embedding: deterministic gradient accumulation into the codebook (index_put is not, on CPU threads).
            selected = nn.functional.embedding(flat_indices, codes)
            # mean((z - sg[e])^2) + beta * mean((e - sg[z])^2); mse_loss fuses each difference, square and mean.
            loss = nn.functional.mse_loss(rows, selected.detach()) + self.beta * nn.functional.mse_loss(
                selected, rows.detach()
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

    On CPU the (N, K) kernel's memory stays with the quantizer from one training call to the next
    (`kernel_workspace`, a `KernelWorkspace`: what the caching allocator does on a GPU); `kernel_workspace.clear()`
    frees it.

    Under `torch.compile` in training mode the solver runs eagerly, outside the graph (one graph break):
    the eager exp-domain solver takes about half the time of the compiled log-domain one, the only solver a graph
    can hold (benchmarks/README.md), and its output, integer indices, has no gradient to trace. For
    `torch.compile(fullgraph=True)` of a training step set the attribute `solver_in_graph = True`: the log-domain
    solver is then traced into the graph (same indices, slower). `torch.export` and `torch.jit.trace` always trace
    it.
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
        self.solver_in_graph = False
        self.kernel_workspace = KernelWorkspace()

    def sinkhorn_codes(self, rows: torch.Tensor, codes: torch.Tensor, distributed: bool) -> torch.Tensor:
        return sinkhorn_codes(
            rows,
            codes,
            self.epsilon,
            self.iterations,
            self.cost_normalization,
            self.chunk_size,
            distributed,
            self.streaming,
            self.kernel_workspace,
        )

    def assign(self, rows: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        if self.training:
            distributed = distributed_group_active()
            if torch.compiler.is_compiling() and not torch.compiler.is_exporting() and not self.solver_in_graph:
                return _sinkhorn_codes_eagerly(self, rows, codes, distributed)
            return self.sinkhorn_codes(rows, codes, distributed=distributed)
        if self.inference_assignment == "sinkhorn":
            return self.sinkhorn_codes(rows, codes, distributed=False)
        return nearest_codes(rows, codes, self.chunk_size)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, epsilon={self.epsilon}, iterations={self.iterations}, "
            f"cost_normalization={self.cost_normalization!r}, inference_assignment={self.inference_assignment!r}, "
            f"streaming={self.streaming}"
        )


@torch.compiler.disable
def _sinkhorn_codes_eagerly(
    quantizer: SinkhornQuantizer, rows: torch.Tensor, codes: torch.Tensor, distributed: bool
) -> torch.Tensor:
    """`quantizer.sinkhorn_codes` run by Python even when called from compiled code (a graph break): the exp-domain
    solver with its fallback, which reads a value on the host."""
    return quantizer.sinkhorn_codes(rows, codes, distributed)


__all__ = ["QuantizerOutput", "SinkhornQuantizer", "VectorQuantizer", "checks_tensor_values", "sinkhorn"]
