"""The original's optional k-means initialisation of the codebook, on encoder features of a few batches, for any
number of heads (all heads share the codebook, so their sub-vectors are pooled)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


@torch.no_grad()
def nearest_centroids(rows: torch.Tensor, centroids: torch.Tensor, chunk_size: int = 4096) -> torch.Tensor:
    """Index of the nearest centroid of each row, computed in chunks of rows."""
    return torch.cat([torch.cdist(block, centroids).argmin(dim=1) for block in rows.split(chunk_size)])


@torch.no_grad()
def kmeans(rows: torch.Tensor, num_clusters: int, iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means of `rows` (N, d) in float32: `num_clusters` centroids (K, d).

    Starts from K distinct random rows; a cluster that empties is re-seeded with a random row.
    """
    rows = rows.float()
    if rows.ndim != 2 or rows.shape[0] < num_clusters:
        raise ValueError(
            f"k-means needs at least num_codes={num_clusters} feature rows, got {rows.shape[0] if rows.ndim else 0}; "
            f"use more kmeans_init_batches"
        )
    generator = torch.Generator().manual_seed(seed)
    pick = lambda count: torch.randperm(rows.shape[0], generator=generator)[:count].to(rows.device)  # noqa: E731
    centroids = rows[pick(num_clusters)].clone()
    for _ in range(iterations):
        assignment = nearest_centroids(rows, centroids)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, rows)
        counts = torch.bincount(assignment, minlength=num_clusters)
        centroids = sums / counts.clamp(min=1).unsqueeze(1).to(sums.dtype)
        empty = (counts == 0).nonzero().flatten()
        if len(empty):
            centroids[empty] = rows[pick(len(empty))]
    return centroids


@torch.no_grad()
def set_codebook(quantizer: torch.nn.Module, codes: torch.Tensor) -> None:
    """Make `quantizer.codebook()` equal `codes` (K, d): the embedding becomes `codes` and a codebook projection,
    if any, the identity (the original writes the centroids into the embedding and keeps the projection, so that
    its codes are a random linear map of the centroids)."""
    quantizer.embedding.weight.copy_(codes)
    if getattr(quantizer, "proj", None) is not None:
        quantizer.proj.weight.copy_(torch.eye(codes.shape[1]))
        quantizer.proj.bias.zero_()


@torch.no_grad()
def latent_rows(model: torch.nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The sub-vectors the quantizer assigns, (B * h * w * num_heads, code_dim): features after `quant_conv`, every
    head's slice a row."""
    latents = model.quant_conv(model.encoder(pixel_values.to(model.quant_conv.weight.dtype)))
    return latents.permute(0, 2, 3, 1).reshape(-1, model.config.code_dim).float()


@torch.no_grad()
def kmeans_init_codebook(
    model: torch.nn.Module,
    batches: Iterable[torch.Tensor],
    accelerator=None,
    iterations: int = 20,
    max_rows: int | None = None,
    seed: int = 0,
) -> torch.Tensor:
    """Initialise the codebook of an `OptVQModel` (unwrapped) by k-means on the latent rows of `batches`.

    With an `accelerator`, the rows of all processes are gathered, k-means runs on the main process, and the codes
    are broadcast, so that every process starts from the same codebook. At most `max_rows` rows (a seeded random
    subset) enter k-means. Returns the codes (num_codes, code_dim).
    """
    was_training = model.training
    model.eval()
    device = model.quant_conv.weight.device
    rows = torch.cat([latent_rows(model, batch.to(device)) for batch in batches])
    model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        rows = accelerator.gather(rows)
    if max_rows is not None and rows.shape[0] > max_rows:
        keep = torch.randperm(rows.shape[0], generator=torch.Generator().manual_seed(seed + 1))[:max_rows]
        rows = rows[keep.to(rows.device)]
    num_codes, code_dim = model.config.num_codes, model.config.code_dim
    if rows.shape[0] < num_codes:  # checked on every process: the main one alone raising would hang the others
        raise ValueError(
            f"k-means initialisation needs at least num_codes={num_codes} feature rows, the batches gave "
            f"{rows.shape[0]}; use more kmeans_init_batches"
        )
    is_main = accelerator is None or accelerator.is_main_process
    codes = kmeans(rows, num_codes, iterations, seed) if is_main else rows.new_empty(num_codes, code_dim)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        codes = broadcast(codes.contiguous(), from_process=0)
    set_codebook(model.quantizer, codes.to(model.quantizer.embedding.weight.dtype))
    return codes
