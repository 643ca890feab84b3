"""Checks that a converted `OptVQModel` computes what the original model computes.

The reference is never the converted model itself:

- `OriginalReference`, the original network written from its formulas and applied to the original weights under
  their original names (always available, also for the released checkpoints), and
- optionally, outputs that the original code itself produced (the fixture's `reference_outputs.safetensors` layout:
  `pixel_values`, `latents`, `quantized`, `indices`, `reconstruction`, `reconstruction_from_indices`,
  `indices_nearest`).

Reconstructions are compared through the decoder from the *same* codes (`decode` of the original's quantized latents,
`decode_indices` of the original's indices), so that the numbers measure the network, not the rare assignment flips
that float rounding causes at near-ties; the assignments are compared separately, by counting differing indices.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from optvq_hf import OptVQModel

from .original_config import OriginalModelSpec
from .original_reference import OriginalReference

# Share of differing nearest-code indices above which the assignment counts as broken: latents that agree to ~1e-6
# can still flip a near-tie, a wrong codebook or head layout flips most indices.
MAX_NEAREST_INDEX_MISMATCH = 0.01
# Sinkhorn indices may differ only at exact float ties of the plan: the solver computes the original's algorithm, its
# `+1e-8` guards included. (Without the guards 8 of the fixture's 2048 indices differ, 2-4% at the paper's sizes.)
MAX_SINKHORN_INDEX_MISMATCH = 0.001
SINKHORN_NOTE = (
    "Sinkhorn indices: optvq-hf computes the original's plan, its +1e-8 guards included, in the log domain; they "
    "may differ from the original's float32 result only at near-exact ties of the plan."
)


@dataclass
class Check:
    """One comparison: a max abs difference (float) or a count of differing indices (int)."""

    name: str
    value: float | int
    limit: float | int | None = None  # None: reported, not enforced
    total: int | None = None  # for counts: how many indices were compared

    @property
    def passed(self) -> bool:
        return self.limit is None or self.value <= self.limit

    def row(self) -> str:
        if isinstance(self.value, int):
            value = f"{self.value} / {self.total} differ"
        else:
            value = f"{self.value:.3g} max abs"
        if self.limit is None:
            limit = "-"
        else:
            limit = f"<= {self.limit}" if isinstance(self.limit, int) else f"<= {self.limit:g}"
        status = "ok" if self.passed else "FAILED"
        return f"| {self.name} | {value} | {limit} | {status} |"


@dataclass
class VerificationReport:
    batch: str
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    def table(self) -> str:
        lines = [f"Verification on {self.batch}:", "", "| check | measured | limit | status |", "|---|---|---|---|"]
        lines += [check.row() for check in self.checks]
        if any("sinkhorn" in check.name for check in self.checks):
            lines += ["", SINKHORN_NOTE]
        return "\n".join(lines)

    def failures(self) -> list[Check]:
        return [check for check in self.checks if not check.passed]


def original_assignment(spec: OriginalModelSpec) -> str:
    """The original model's eval-mode assignment: batch Sinkhorn argmax (OptVQ) or nearest code (base VQ)."""
    return "sinkhorn" if spec.quantizer_type == "optvq" else "nearest"


@contextlib.contextmanager
def inference_assignment(model: OptVQModel, assignment: str) -> Iterator[None]:
    """Temporarily switch the model's eval-mode assignment ("nearest" or "sinkhorn")."""
    quantizer = model.quantizer
    if not hasattr(quantizer, "inference_assignment"):
        if assignment != "nearest":
            raise ValueError(f"a {type(quantizer).__name__} assigns by nearest code only")
        yield
        return
    previous = quantizer.inference_assignment
    quantizer.inference_assignment = assignment
    try:
        yield
    finally:
        quantizer.inference_assignment = previous


def fixed_batch(batch_size: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """A reproducible batch in [-1, 1]: smooth random images (noise blurred and upsampled), not pure noise."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch_size, channels, max(size // 8, 1), max(size // 8, 1), generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    detail = 0.1 * torch.rand(batch_size, channels, size, size, generator=generator)
    return (smooth * 0.9 + detail).mul(2).sub(1).clamp(-1, 1)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _differ(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).sum())


@torch.no_grad()
def verify_conversion(
    model: OptVQModel,
    spec: OriginalModelSpec,
    original_weights: dict[str, torch.Tensor],
    reference_outputs: dict[str, torch.Tensor] | None = None,
    batch_size: int = 2,
    image_size: int | None = None,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> VerificationReport:
    """
    Compare `model` with the original formulas on the original weights (and with `reference_outputs`, if given).

    Args:
        model: the converted model.
        spec: the original configuration.
        original_weights: the original model weights, original names, wrappers stripped.
        reference_outputs: outputs of the original code (fixture layout); their `pixel_values` become the batch.
        batch_size, image_size: the fixed batch when no reference outputs are given (image side defaults to the
            config's resolution).
        tolerance: largest accepted max abs difference of latents and reconstructions.
        seed: seed of the fixed batch.
    """
    model = model.eval()
    reference = OriginalReference(spec, original_weights)
    device = next(model.parameters()).device
    if reference_outputs is not None:
        if "pixel_values" not in reference_outputs:
            raise ValueError("reference outputs must hold `pixel_values` (the batch they were computed on)")
        pixels = reference_outputs["pixel_values"].float()
        batch = f"the {tuple(pixels.shape)} batch of the reference outputs"
    else:
        size = image_size or model.config.resolution
        pixels = fixed_batch(batch_size, model.config.in_channels, size, seed)
        batch = f"a fixed batch {tuple(pixels.shape)} (seed {seed})"
    report = VerificationReport(batch=batch)
    add = report.checks.append

    def ours(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device)

    # -- against the original formulas on the original weights --------------------------------------------------------
    ref_latents = reference.latents(pixels)
    rule = original_assignment(spec)
    ref_quantized, ref_indices = reference.quantize(ref_latents, rule)
    _, ref_nearest = reference.quantize(ref_latents, "nearest")
    with inference_assignment(model, "nearest"):
        encoded = model.encode(ours(pixels))
    add(Check("latents vs original formulas", _max_abs(encoded.latents.cpu(), ref_latents), tolerance))
    add(
        Check(
            "decode(original quantized) vs original formulas",
            _max_abs(model.decode(ours(ref_quantized)).sample.cpu(), reference.decode(ref_quantized)),
            tolerance,
        )
    )
    add(
        Check(
            "decode_indices(original indices) vs original decode_code",
            _max_abs(model.decode_indices(ours(ref_indices)).sample.cpu(), reference.decode_code(ref_indices)),
            tolerance,
        )
    )
    nearest_limit = int(MAX_NEAREST_INDEX_MISMATCH * ref_nearest.numel())
    add(
        Check(
            "indices, nearest, vs original formulas' argmin",
            _differ(encoded.indices.cpu(), ref_nearest),
            nearest_limit,
            ref_nearest.numel(),
        )
    )
    if rule == "sinkhorn":
        with inference_assignment(model, "sinkhorn"):
            sinkhorn_indices = model.encode(ours(pixels)).indices.cpu()
        sinkhorn_limit = int(MAX_SINKHORN_INDEX_MISMATCH * ref_indices.numel())
        add(
            Check(
                "indices, sinkhorn, vs original float32 Sinkhorn",
                _differ(sinkhorn_indices, ref_indices),
                sinkhorn_limit,
                ref_indices.numel(),
            )
        )

    # -- against outputs of the original code -------------------------------------------------------------------------
    if reference_outputs is not None:
        outputs = reference_outputs
        if "latents" in outputs:
            add(Check("latents vs original outputs", _max_abs(encoded.latents.cpu(), outputs["latents"]), tolerance))
            add(
                Check(
                    "(original formulas' latents vs original outputs)",
                    _max_abs(ref_latents, outputs["latents"]),
                    tolerance,
                )
            )
        if "quantized" in outputs and "reconstruction" in outputs:
            add(
                Check(
                    "decode(original quantized) vs original reconstruction",
                    _max_abs(model.decode(ours(outputs["quantized"])).sample.cpu(), outputs["reconstruction"]),
                    tolerance,
                )
            )
        if "indices" in outputs and "reconstruction_from_indices" in outputs:
            add(
                Check(
                    "decode_indices(original indices) vs original reconstruction",
                    _max_abs(
                        model.decode_indices(ours(outputs["indices"])).sample.cpu(),
                        outputs["reconstruction_from_indices"],
                    ),
                    tolerance,
                )
            )
        if "indices_nearest" in outputs:
            nearest_differ = _differ(encoded.indices.cpu(), outputs["indices_nearest"])
            add(
                Check(
                    "indices, nearest, vs original argmin",
                    nearest_differ,
                    nearest_limit,
                    outputs["indices_nearest"].numel(),
                )
            )
        if "indices" in outputs and rule == "sinkhorn":
            add(
                Check(
                    "indices, sinkhorn, vs original outputs",
                    _differ(sinkhorn_indices, outputs["indices"]),
                    sinkhorn_limit,
                    outputs["indices"].numel(),
                )
            )
            add(
                Check(
                    "(original formulas' Sinkhorn indices vs original outputs)",
                    _differ(ref_indices, outputs["indices"]),
                    None,
                    outputs["indices"].numel(),
                )
            )
    return report


__all__ = [
    "Check",
    "VerificationReport",
    "fixed_batch",
    "inference_assignment",
    "original_assignment",
    "verify_conversion",
]
