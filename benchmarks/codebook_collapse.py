"""Codebook collapse: OptVQ against the plain nearest-neighbour VQ baseline, on offline data.

The paper's central claim: with Sinkhorn (optimal transport) assignment during training, every code of the codebook
is used, without any special initialisation, while plain VQ (nearest code, straight-through, the same losses) leaves
most of the codebook dead; and the reconstructions are at least as good.

For each data set and codebook size, two models are trained that differ ONLY in `quantizer_type` ("optvq" / "vq"):
the same architecture (the plain CNN of the original MNIST / CIFAR-10 setups: `backbone="simple_cnn"`, 32x32 images,
an 8x8 latent grid, codebook projection on; 4 heads of 8 dimensions: `embed_dim` 32), the same initial weights (same
seed; checked), the same batches in the same order, the same objective (the original's MNIST/CIFAR `AELoss`:
L1 + L2 + quantizer loss, no perceptual or GAN term), Adam with the same learning rate, gradient-norm clipping at 1
(as the original's training loop), and the same step budget.

Code dimension: the original MNIST configs quantize 8 channels, OptVQ with 4 heads (2-dimensional codes) and the VQ
baseline with 1 head (8-dimensional codes). One architecture must serve both here, and 4 heads of 8 dimensions keeps
the baseline's code dimension and OptVQ's head count. With 2-dimensional codes (`--embed_dim 8`) nearest-neighbour
VQ hardly collapses at all (a plane is easy to cover), so that setting does not test the claim.

Learning rate: 3e-3 for both (the original's MNIST/CIFAR configs peak at 4.5e-6 x batch 1024 = 4.6e-3 with
AdamW and one-cycle; Adam moves a code by about one learning rate per step, so the step budget times the learning
rate bounds how far the codes travel). At each checkpoint both are evaluated on held-out
images in eval mode (nearest-code assignment for both):

- usage (nearest): fraction of the K codes that are the nearest code of at least one validation vector (all heads;
  the heads share one codebook), and the count of used codes. This package's inference rule, for both quantizers;
- usage (sinkhorn), OptVQ only: the same count when each batch of `--sinkhorn_eval_batch` validation images is
  assigned by the argmax of its Sinkhorn plan, which is what the original implementation does in eval mode and so
  what the paper's usage numbers measure. A balanced plan spreads a batch over the whole codebook almost by
  construction, so this column is expected near 100%; the nearest-code column is the demanding one;
- perplexity: exp(entropy) of the code frequencies on the validation set (K for uniform use);
- L1: mean |reconstruction - image| in [-1, 1] units (the training loss's L1);
- PSNR: per-image PSNR in dB on all channels, images in [0, 1], averaged (`optvq_hf.metrics.psnr`, y_channel=False).

Data (offline, from `optvq_hf.training.data`; needs the `demo` extra: scikit-image and scikit-learn):

- photos: random square crops (flipped at random) of scikit-image's sample photographs, resized to 32x32; the
  validation set is the non-overlapping tiles of two whole photographs held out from training (coffee, camera), at
  the same scale as the training crops. Crop `i` of step `s` is a pure function of (seed, s, i).
- digits: scikit-learn's 8x8 handwritten digits upsampled to 32x32 (bicubic), 1 channel; 1500 for training (batches
  drawn with a seeded generator), the last 297 for validation.

Counting K codes needs many more validation vectors than K: a set of V vectors spread uniformly over K codes misses
about K * exp(-V / K) of them by chance alone. The script prints V (validation images x latent positions x heads).

    python benchmarks/codebook_collapse.py            # defaults: about 8 min on 2 CPU cores shared with other work
    python benchmarks/codebook_collapse.py --steps 200 --eval_every 100 --codebook_sizes 256 --datasets digits
    python benchmarks/codebook_collapse.py --num_threads 2 --json results.json

`--num_threads 1` (default) because the benchmark is meant for a shared machine: on two cores busy with other work,
two intra-op threads made a training step of this small model 5 to 20 times slower than one thread.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
from optvq_hf.metrics import codebook_usage, perplexity, psnr
from optvq_hf.training.data import RandomCropTransform, skimage_photos, sklearn_digits

QUANTIZERS = ("optvq", "vq")
DATASETS = ("photos", "digits")


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class BenchmarkData:
    """Training batches as a function of the step, and the validation images (N, C, R, R) in [-1, 1]."""

    name: str
    channels: int
    train_batch: Callable[[int], torch.Tensor]
    validation: torch.Tensor
    description: str


def photo_data(resolution: int, batch_size: int, seed: int, tile_fraction: float) -> BenchmarkData:
    """Random crops of the training photos; validation: tiles of the held-out photos at the same scale."""
    photos, tiles = skimage_photos(validation_tile_fraction=tile_fraction)
    # Crops of 0.7x to 1.4x the validation tiles' side (area fraction of the shorter-side square: tile_fraction^2).
    scale = (min(1.0, tile_fraction**2 / 2), min(1.0, 2 * tile_fraction**2))
    transform = RandomCropTransform(resolution, scale=scale, flip=True, num_channels=3)

    def train_batch(step: int) -> torch.Tensor:
        crops = []
        for i in range(batch_size):
            rng = np.random.default_rng([seed, step, i])
            crops.append(transform(photos[int(rng.integers(len(photos)))], rng))
        return torch.from_numpy(np.stack(crops))

    processor = OptVQImageProcessor(resolution=resolution)
    validation = processor(tiles)["pixel_values"]
    side = tiles[0].width
    description = (
        f"{len(photos)} training photos, random crops of {round(scale[0] ** 0.5 * side / tile_fraction)}"
        f"-{round(scale[1] ** 0.5 * side / tile_fraction)} px resized to {resolution}; validation: "
        f"{len(tiles)} non-overlapping {side}x{side} tiles of 2 held-out photos"
    )
    return BenchmarkData("photos", 3, train_batch, validation, description)


def digit_data(resolution: int, batch_size: int, seed: int) -> BenchmarkData:
    """The digits upsampled once; training batches drawn with replacement by a seeded generator."""
    train, held_out = sklearn_digits()
    processor = OptVQImageProcessor(resolution=resolution, num_channels=1)
    train_images = processor(train)["pixel_values"]
    validation = processor(held_out)["pixel_values"]

    def train_batch(step: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return train_images[torch.randint(len(train_images), (batch_size,), generator=generator)]

    description = f"{len(train)} training digits, {len(held_out)} held out, 8x8 upsampled to {resolution} (bicubic)"
    return BenchmarkData("digits", 1, train_batch, validation, description)


# ---------------------------------------------------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, channels: int, num_codes: int, quantizer_type: str) -> OptVQModel:
    config = OptVQConfig(
        resolution=args.resolution,
        in_channels=channels,
        out_channels=channels,
        backbone="simple_cnn",
        base_channels=args.base_channels,
        latent_channels=args.latent_channels,
        embed_dim=args.embed_dim,
        num_heads=args.num_heads,
        num_codes=num_codes,
        quantizer_type=quantizer_type,
    )
    torch.manual_seed(args.seed)
    return OptVQModel(config)


@torch.no_grad()
def evaluate(model: OptVQModel, images: torch.Tensor, sinkhorn_batch: int, batch_size: int = 256) -> dict[str, float]:
    """
    Usage, perplexity, L1 and PSNR on the validation images in eval mode (nearest code, this package's inference
    rule), and for OptVQ also `usage_sinkhorn`: the usage under the original implementation's eval-time rule (the
    argmax of the Sinkhorn plan over each batch of `sinkhorn_batch` validation images), the rule behind the paper's
    usage numbers. It is near-uniform by construction whenever a batch holds several vectors per code.
    """
    model.eval()
    num_codes = model.config.num_codes
    counts = torch.zeros(num_codes, dtype=torch.int64)
    l1_sum, psnr_sum = 0.0, 0.0
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        output = model(x)
        reconstruction = output.reconstruction.clamp(-1, 1)
        counts += torch.bincount(output.indices.flatten(), minlength=num_codes)
        l1_sum += (reconstruction - x).abs().mean(dim=(1, 2, 3)).sum().item()
        psnr_sum += psnr((reconstruction + 1) / 2, (x + 1) / 2, y_channel=False).sum().item()
    results = {
        "usage": float(codebook_usage(counts)),
        "used_codes": int((counts > 0).sum()),
        "perplexity": float(perplexity(counts)),
        "l1": l1_sum / len(images),
        "psnr": psnr_sum / len(images),
        "usage_sinkhorn": None,
    }
    if model.config.quantizer_type == "optvq":
        model.quantizer.inference_assignment = "sinkhorn"
        sinkhorn_counts = torch.zeros(num_codes, dtype=torch.int64)
        for start in range(0, len(images), sinkhorn_batch):
            indices = model.encode(images[start : start + sinkhorn_batch]).indices
            sinkhorn_counts += torch.bincount(indices.flatten(), minlength=num_codes)
        model.quantizer.inference_assignment = "nearest"
        results["usage_sinkhorn"] = float(codebook_usage(sinkhorn_counts))
    model.train()
    return results


def train_and_evaluate(
    model: OptVQModel, data: BenchmarkData, args: argparse.Namespace, checkpoints: Sequence[int]
) -> list[dict]:
    """Train for max(checkpoints) steps; evaluate at each checkpoint."""
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    model.train()
    results = []
    for step in range(1, max(checkpoints) + 1):
        x = data.train_batch(step)
        output = model(x)
        reconstruction = output.reconstruction
        # The original's AELoss of its MNIST / CIFAR-10 configs: L1 + L2 + quantizer loss, all with weight 1.
        loss = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x) + output.quantizer_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step in checkpoints:
            metrics = evaluate(model, data.validation, args.sinkhorn_eval_batch)
            results.append({"step": step, "train_loss": loss.item(), **metrics})
    return results


def same_initial_weights(a: OptVQModel, b: OptVQModel) -> bool:
    state_a, state_b = a.state_dict(), b.state_dict()
    return state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------
def print_table(name: str, num_codes: int, rows: dict[str, list[dict]], seconds: dict[str, float]) -> None:
    print(
        f"\n{name}, K = {num_codes} codes (training time: "
        + ", ".join(f"{q} {seconds[q]:.0f} s" for q in QUANTIZERS)
        + ")"
    )
    print(
        "| step | quantizer | usage (nearest) | used codes | perplexity | val L1 | val PSNR (dB) | usage (sinkhorn) |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for i in range(len(rows["optvq"])):
        for quantizer in QUANTIZERS:
            r = rows[quantizer][i]
            sinkhorn = "-" if r["usage_sinkhorn"] is None else f"{100 * r['usage_sinkhorn']:.1f}%"
            print(
                f"| {r['step']} | {quantizer} | {100 * r['usage']:.1f}% | {r['used_codes']}/{num_codes} | "
                f"{r['perplexity']:.1f} | {r['l1']:.4f} | {r['psnr']:.2f} | {sinkhorn} |"
            )


def verdict(num_codes: int, rows: dict[str, list[dict]]) -> dict[str, bool]:
    """The paper's claim, checked on these numbers: OptVQ within one code of full usage (nearest code) at every
    checkpoint, the baseline below half, OptVQ's final PSNR and L1 at least as good; and, for reference, OptVQ within
    one code of full usage under the original's eval-time Sinkhorn rule."""
    optvq, vq = rows["optvq"], rows["vq"]
    return {
        "optvq_full_usage_at_every_checkpoint": all(r["used_codes"] >= num_codes - 1 for r in optvq),
        "baseline_below_half_at_every_checkpoint": all(r["usage"] < 0.5 for r in vq),
        "optvq_reconstruction_at_least_as_good_at_the_end": optvq[-1]["psnr"] >= vq[-1]["psnr"]
        and optvq[-1]["l1"] <= vq[-1]["l1"],
        "optvq_full_sinkhorn_usage_at_every_checkpoint": all(
            r["usage_sinkhorn"] * num_codes >= num_codes - 1 for r in optvq
        ),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(DATASETS), help=f"comma list among {', '.join(DATASETS)}")
    parser.add_argument("--codebook_sizes", default="256,1024,4096", help="comma list of codebook sizes K")
    parser.add_argument("--steps", type=int, default=300, help="training steps of every run")
    parser.add_argument("--eval_every", type=int, default=100, help="steps between checkpoints")
    parser.add_argument("--batch_size", type=int, default=16, help="training images per step")
    parser.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (both quantizers)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--base_channels", type=int, default=32, help="simple_cnn width (the original MNIST: 32)")
    parser.add_argument("--latent_channels", type=int, default=32)
    parser.add_argument("--embed_dim", type=int, default=32, help="quantized channels, split over the heads")
    parser.add_argument("--num_heads", type=int, default=4, help="quantizer heads (the original MNIST OptVQ: 4)")
    parser.add_argument(
        "--tile_fraction",
        type=float,
        default=1 / 12,
        help="photos: validation tile side / the photos' shorter side (384 px)",
    )
    parser.add_argument(
        "--sinkhorn_eval_batch",
        type=int,
        default=64,
        help="validation images per batch for OptVQ's usage under the original's eval-time Sinkhorn assignment",
    )
    parser.add_argument("--num_threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", default=None, help="also write all numbers to this JSON file")
    args = parser.parse_args(argv)
    args.datasets = [name.strip() for name in args.datasets.split(",") if name.strip()]
    unknown = [name for name in args.datasets if name not in DATASETS]
    if unknown or not args.datasets:
        raise ValueError(f"--datasets: unknown {unknown}; choose among {DATASETS}")
    try:
        args.codebook_sizes = [int(k) for k in args.codebook_sizes.split(",")]
    except ValueError as error:
        raise ValueError(f"--codebook_sizes must be a comma list of integers, got {args.codebook_sizes!r}") from error
    if any(k < 1 for k in args.codebook_sizes):
        raise ValueError(f"--codebook_sizes must be positive, got {args.codebook_sizes}")
    for flag in ("steps", "eval_every", "batch_size", "num_threads", "sinkhorn_eval_batch"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 < args.tile_fraction <= 1:
        raise ValueError(f"--tile_fraction must be in (0, 1], got {args.tile_fraction}")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    checkpoints = sorted({*range(args.eval_every, args.steps + 1, args.eval_every), args.steps})
    start = time.perf_counter()
    print(
        f"codebook collapse: simple_cnn {args.resolution}x{args.resolution}, embed_dim {args.embed_dim}, "
        f"{args.num_heads} heads, batch {args.batch_size}, {args.steps} steps, Adam lr {args.lr}, seed {args.seed}, "
        f"{args.num_threads} thread(s), torch {torch.__version__}"
    )
    report: dict = {"args": {k: v for k, v in vars(args).items()}, "results": {}}
    for name in args.datasets:
        if name == "photos":
            data = photo_data(args.resolution, args.batch_size, args.seed, args.tile_fraction)
        else:
            data = digit_data(args.resolution, args.batch_size, args.seed)
        latent = args.resolution // 4
        vectors = len(data.validation) * latent * latent * args.num_heads
        largest = max(args.codebook_sizes)
        print(f"\n## {name}: {data.description}")
        print(
            f"validation vectors: {len(data.validation)} images x {latent}x{latent} positions x {args.num_heads} "
            f"heads = {vectors}; at uniform use, K = {largest} would miss "
            f"{largest * math.exp(-vectors / largest):.2g} codes by chance"
        )
        for num_codes in args.codebook_sizes:
            models = {q: build_model(args, data.channels, num_codes, q) for q in QUANTIZERS}
            if not same_initial_weights(models["optvq"], models["vq"]):
                raise RuntimeError("the two quantizer types did not get the same initial weights")
            rows, seconds = {}, {}
            for quantizer, model in models.items():
                run_start = time.perf_counter()
                rows[quantizer] = train_and_evaluate(model, data, args, checkpoints)
                seconds[quantizer] = time.perf_counter() - run_start
            print_table(name, num_codes, rows, seconds)
            checks = verdict(num_codes, rows)
            print("claim: " + ", ".join(f"{key} = {'yes' if ok else 'NO'}" for key, ok in checks.items()))
            report["results"][f"{name}/{num_codes}"] = {"rows": rows, "seconds": seconds, "claim": checks}
    wall = time.perf_counter() - start
    report["wall_seconds"] = wall
    print(f"\nwall time: {wall:.0f} s")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    return report


if __name__ == "__main__":
    main()
