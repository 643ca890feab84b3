"""The original OptVQ assignment written from its formulas, in float64, as the reference the tests compare with.

Original (GitHub zbr17/OptVQ, `VectorQuantizerSinkhorn`): D = cdist(z, codes); "all" normalisation
D' = (D - mean) / (std + 1e-6), D' -= min(D'); Q = exp(-epsilon * D'), normalised to total mass 1; each iteration
scales the code columns to mass 1/K, then the rows to mass 1/N; index = argmax of each row. The float32 `+1e-8` guards
of the original are left out: in float64 they are what loses precision, not what the formulas mean.
"""

import math

import torch


def normalize_cost(distances: torch.Tensor, mode: str, code_dim: int) -> torch.Tensor:
    if mode == "all":
        normalized = (distances - distances.mean()) / (distances.std() + 1e-6)
        return normalized - normalized.min()
    if mode == "dim":
        return distances / math.sqrt(code_dim)
    return distances


def original_plan(cost: torch.Tensor, epsilon: float, iterations: int, guard: float = 0.0) -> torch.Tensor:
    """The original `sinkhorn(cost, n_iters, epsilon)` (rows of the result sum to 1), in the dtype of `cost`."""
    plan = torch.exp(-cost * epsilon).t()  # (K, N)
    num_codes, num_rows = plan.shape
    plan = plan / (plan.sum() + guard)
    for _ in range(iterations):
        plan = plan / (plan.sum(dim=1, keepdim=True) + guard) / num_codes
        plan = plan / (plan.sum(dim=0, keepdim=True) + guard) / num_rows
    return (plan * num_rows).t()


def original_indices(
    rows: torch.Tensor, codes: torch.Tensor, epsilon: float = 10.0, iterations: int = 5, mode: str = "all"
) -> torch.Tensor:
    """Argmax of the original plan for (N, d) rows and (K, d) codes: float32 distances (as the quantizer computes
    them, so that both start from the same numbers), everything after them in float64."""
    distances = torch.cdist(rows.float(), codes.float()).double()
    return original_plan(normalize_cost(distances, mode, codes.shape[1]), epsilon, iterations).argmax(dim=1)
