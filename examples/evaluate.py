#!/usr/bin/env python
"""
Reconstruction metrics of an OptVQ tokenizer on any image dataset: PSNR, SSIM, LPIPS, rFID, codebook usage and
perplexity, with the protocol of the original OptVQ evaluation (see `optvq_hf.metrics`).

Launch (from the repository root):

    # one process, CPU or one GPU, on a local folder of images (a `datasets` imagefolder)
    python examples/evaluate.py --model path/to/model --data_dir path/to/images --output_dir eval-out

    # a Hub dataset on 8 GPUs of one node (every image counted exactly once)
    accelerate launch --num_processes 8 examples/evaluate.py --model <org>/optvq-imagenet \
        --dataset_name ILSVRC/imagenet-1k --split validation --batch_size 32 --output_dir eval-imagenet

    # several nodes: the same command on every node, with accelerate's --num_machines, --machine_rank,
    # --main_process_ip and --main_process_port

Each image is resized so that its shorter side equals the model's resolution and center-cropped to a square
(`OptVQImageProcessor`), encoded, quantized (eval mode: the model's `inference_assignment`, nearest code by default,
so the tokens of an image do not depend on its batch) and decoded. The per-image scores, Inception features and code
indices of every process are gathered with `accelerator.gather_for_metrics`, which drops the duplicates a
distributed sampler appends to the last batch, so the numbers equal a one-process run.

`--output_dir` receives `metrics.json` (one number per metric, keyed by the names of `--metrics`; `null` for an
undefined value such as rFID of a single image), `metrics.md` (a Markdown table with the protocol of each number) and
`reconstructions.png` (originals on the top row, their reconstructions below).

Metrics that need weights or packages this machine lacks (LPIPS: the torchvision backbone and lpips head files;
rFID: the `pytorch-fid` package and its Inception weights) are skipped with a warning under the default
`--metrics all`, and raise an error naming what to install when requested by name.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from optvq_hf import OptVQImageProcessor, OptVQModel
from optvq_hf.metrics import METRIC_NAMES, InceptionFeatureExtractor, ReconstructionMetrics
from optvq_hf.training.cli import option, parse_options
from optvq_hf.training.data import ImageList, ValidationImages
from optvq_hf.training.images import reconstruction_grid
from optvq_hf.training.perceptual import LPIPS

# What each number means, written next to it in metrics.md.
PROTOCOL = {
    "psnr": "PSNR (dB) on Y of YCbCr (BT.601), data range 1, per image, averaged (pyiqa, as the original eval)",
    "psnr_rgb": "PSNR (dB) over the RGB channels, data range 1, per image, averaged",
    "ssim": "SSIM on Y of YIQ rounded to 8 bits, 11x11 Gaussian window (sigma 1.5), per image, averaged (pyiqa)",
    "lpips": "LPIPS v0.1, AlexNet (pyiqa's default, as the original eval), per image, averaged",
    "lpips_vgg": "LPIPS v0.1, VGG16 (the network of the training loss), per image, averaged",
    "rfid": "Frechet distance of pytorch-fid InceptionV3 pool features (2048-d), all reconstructions vs all originals",
    "usage": "fraction of the codebook used at least once over the whole set (all heads, shared codebook)",
    "perplexity": "exp(entropy) of the code frequencies over the whole set (all heads)",
}
# Metrics whose default networks need files or packages that may be missing.
OPTIONAL_METRICS = ("lpips", "lpips_vgg", "rfid")
GRID_FILENAME = "reconstructions.png"


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class EvaluateOptions:
    """Every option of an evaluation; a YAML or JSON `--config` file holds the same keys, the command line wins."""

    model: str | None = option(None, "a folder saved by save_pretrained (or a checkpoint-<step>), or a Hub model id")
    dataset_name: str | None = option(None, "a `datasets` dataset on the Hub (exactly one of this and data_dir)")
    dataset_config_name: str | None = option(None, "the configuration of dataset_name, if any")
    data_dir: str | None = option(None, "a local folder of images (a `datasets` imagefolder)")
    split: str | None = option(
        None,
        "the split to evaluate; default 'validation' for dataset_name, and for data_dir the folder's only split (or "
        "'validation' when it has several)",
    )
    image_column: str | None = option(None, "column holding the images; default 'image', else the only Image column")
    batch_size: int = option(32, "images per batch and per process")
    max_samples: int | None = option(None, "evaluate the first N images of the split only")
    metrics: str = option(
        "all",
        f"comma-separated list among {', '.join(METRIC_NAMES)}; or 'all' (default), which skips with a warning the "
        "metrics whose weights or packages are missing",
    )
    resample: str | None = option(
        None,
        "resizing filter: nearest, bilinear, bicubic, lanczos, box, hamming, or opencv_bilinear (OpenCV's "
        "INTER_LINEAR, as the original OptVQ evaluation resizes); default: the filter of the processor saved with the "
        "model, else bicubic",
    )
    output_dir: str = option("eval-output", "where metrics.json, metrics.md and the grid go")
    num_workers: int = option(min(4, os.cpu_count() or 1), "DataLoader worker processes (0: none)")
    num_grid_images: int = option(8, "images shown in reconstructions.png (0: none)")


def parse_args(argv: Sequence[str] | None = None) -> EvaluateOptions:
    args = parse_options(EvaluateOptions, argv, description=__doc__.split("\n\n")[0])
    check_args(args)
    return args


def check_args(args: EvaluateOptions) -> None:
    """Raise a `ValueError` naming the flag for every invalid combination."""
    if args.model is None:
        raise ValueError("--model is required: a saved folder or a Hub model id")
    if (args.dataset_name is None) == (args.data_dir is None):
        raise ValueError("pass exactly one of --dataset_name (a Hub dataset) and --data_dir (a local image folder)")
    if args.data_dir is not None and not os.path.isdir(args.data_dir):
        raise ValueError(f"--data_dir {args.data_dir!r} is not a directory")
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be >= 1, got {args.batch_size}")
    if args.max_samples is not None and args.max_samples < 1:
        raise ValueError(f"--max_samples must be >= 1, got {args.max_samples}")
    if args.num_workers < 0:
        raise ValueError(f"--num_workers must be >= 0, got {args.num_workers}")
    if args.num_grid_images < 0:
        raise ValueError(f"--num_grid_images must be >= 0, got {args.num_grid_images}")
    parse_metrics(args.metrics)
    if args.resample is not None:
        try:
            OptVQImageProcessor(resample=args.resample)
        except ValueError as error:
            raise ValueError(f"--resample {args.resample!r}: {error}") from None


def parse_metrics(spec: str) -> tuple[list[str], bool]:
    """`--metrics` -> (metric names in canonical order, whether they were named explicitly rather than 'all')."""
    names = [name.strip() for name in spec.split(",") if name.strip()]
    if names == ["all"]:
        return list(METRIC_NAMES), False
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown or not names:
        raise ValueError(
            f"--metrics: unknown metric name(s) {unknown or [spec]}; use 'all' or a comma-separated list among "
            f"{', '.join(METRIC_NAMES)}"
        )
    return [name for name in METRIC_NAMES if name in names], True


# ---------------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------------
def load_image_dataset(
    dataset_name: str | None = None,
    data_dir: str | None = None,
    split: str | None = None,
    dataset_config_name: str | None = None,
    max_samples: int | None = None,
) -> tuple[datasets.Dataset, str]:
    """
    The split to evaluate, as a `datasets.Dataset`, and the name of that split.

    A local folder is loaded as an imagefolder (its sub-folders named train/validation/test become splits); without
    `split`, its only split is used, or "validation" when it has several. A Hub dataset defaults to "validation".
    """
    if data_dir is not None:
        splits = datasets.load_dataset("imagefolder", data_dir=data_dir)
        if split is None:
            split = next(iter(splits)) if len(splits) == 1 else "validation"
        if split not in splits:
            raise ValueError(f"--split {split!r} not in the splits of --data_dir {data_dir!r}: {sorted(splits)}")
        dataset = splits[split]
    else:
        split = split or "validation"
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, split=split)
    if len(dataset) == 0:
        raise ValueError(f"split {split!r} of {data_dir or dataset_name!r} has no images")
    if max_samples is not None:
        dataset = dataset.select(range(min(max_samples, len(dataset))))
    return dataset, split


def find_image_column(dataset: datasets.Dataset, image_column: str | None) -> str:
    """`image_column` if the dataset has it; by default 'image', else the only column of `datasets.Image` type."""
    if image_column is not None:
        if image_column not in dataset.column_names:
            raise ValueError(f"--image_column {image_column!r} not in the dataset's columns {dataset.column_names}")
        return image_column
    if "image" in dataset.column_names:
        return "image"
    image_columns = [name for name, feature in dataset.features.items() if isinstance(feature, datasets.Image)]
    if len(image_columns) != 1:
        raise ValueError(
            f"cannot tell which column holds the images (columns {dataset.column_names}); pass --image_column"
        )
    return image_columns[0]


def build_processor(model_name_or_path: str, model: OptVQModel, resample=None) -> OptVQImageProcessor:
    """The model's processor at the model's resolution, with `resample` if given, else the resampling filter of a
    processor saved with the model (its only contribution), else bicubic."""
    if resample is None:
        resample = "bicubic"
        try:
            resample = OptVQImageProcessor.from_pretrained(model_name_or_path).resample
        except (OSError, ValueError):  # no preprocessor_config.json next to the model
            pass
    return OptVQImageProcessor(
        resolution=model.config.resolution, num_channels=model.config.in_channels, resample=resample
    )


# ---------------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------------
def build_metrics(
    names: list[str], explicit: bool, model: OptVQModel, device: torch.device
) -> tuple[ReconstructionMetrics, dict[str, str]]:
    """
    The accumulator for `names`, and {skipped metric: reason}.

    LPIPS and rFID networks whose files or packages are missing make the metric skipped (with a warning) when it
    came from '--metrics all', and raise the loading error (which says what to install) when it was named.
    """
    lpips_models, fid_extractor, skipped = {}, None, {}
    for name in [n for n in names if n in OPTIONAL_METRICS]:
        try:
            if name == "rfid":
                fid_extractor = InceptionFeatureExtractor()
            else:
                lpips_models[name] = LPIPS.from_pretrained(backbone="alex" if name == "lpips" else "vgg")
        except (ImportError, OSError, RuntimeError) as error:
            if explicit:
                raise
            skipped[name] = f"{type(error).__name__}: {error}"
            warnings.warn(
                stacklevel=2,
                message=f"skipping {name} (not requested by name; its weights or package are missing): {error}",
            )
    kept = [name for name in names if name not in skipped]
    metrics = ReconstructionMetrics(
        kept,
        num_codes=model.config.num_codes,
        num_heads=model.config.num_heads,
        device=device,
        fid_feature_extractor=fid_extractor,
        lpips_models=lpips_models,
    )
    return metrics, skipped


def as_rgb(images: torch.Tensor) -> torch.Tensor:
    # The metrics are defined on RGB; a grayscale image is the RGB image with three equal channels.
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def evaluate(
    model: OptVQModel,
    dataloader: DataLoader,
    metrics: ReconstructionMetrics,
    accelerator: Accelerator,
    num_grid_images: int = 8,
) -> tuple[dict[str, float], torch.Tensor, torch.Tensor]:
    """
    Run the model over a prepared dataloader; returns `metrics.compute()` over all processes and up to
    `num_grid_images` (originals, reconstructions) of the main process (float tensors in [-1, 1], on the CPU).
    """
    model.eval()
    originals, reconstructions = [], []
    progress = tqdm(dataloader, desc="evaluating", unit="batch", disable=not accelerator.is_local_main_process)
    for pixel_values in progress:
        with accelerator.autocast():
            output = model(pixel_values)
        reconstruction = output.reconstruction.float()
        if sum(len(batch) for batch in originals) < num_grid_images:
            originals.append(pixel_values.cpu())
            reconstructions.append(reconstruction.cpu())
        stats = metrics.sample_statistics(as_rgb(pixel_values), as_rgb(reconstruction), output.indices)
        # Every process receives every process's statistics, without the padding duplicates of the last batch.
        metrics.accumulate(accelerator.gather_for_metrics(stats))
    empty = torch.empty(0, model.config.in_channels, model.config.resolution, model.config.resolution)
    grid_originals = torch.cat(originals)[:num_grid_images] if originals else empty
    grid_reconstructions = torch.cat(reconstructions)[:num_grid_images] if reconstructions else empty
    return metrics.compute(), grid_originals, grid_reconstructions


# ---------------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------------
def save_grid(
    originals: torch.Tensor,
    reconstructions: torch.Tensor,
    processor: OptVQImageProcessor,
    path: str | Path,
    gap: int = 2,
) -> None:
    """A PNG with the originals on the top row and their reconstructions below, separated by white gaps."""
    top = processor.postprocess(originals, output_type="np")
    bottom = processor.postprocess(reconstructions, output_type="np")
    if top.ndim == 3:  # (N, H, W) for one channel
        top, bottom = top[..., None], bottom[..., None]
    reconstruction_grid(top, bottom, pad=gap).save(path)


def markdown_report(
    results: dict[str, float], per_head: dict[str, float], skipped: dict[str, str], context: dict[str, str]
) -> str:
    """metrics.md: what was evaluated, a table of the numbers with the protocol of each, per-head codebook values."""
    lines = ["# Reconstruction metrics", ""]
    lines += [f"- {key}: {value}" for key, value in context.items()]
    lines += ["", "| metric | value | protocol |", "|---|---:|---|"]
    for name, value in results.items():
        lines.append(f"| {name} | {format_number(value)} | {PROTOCOL[name]} |")
    if per_head:
        lines += ["", "Per head: " + ", ".join(f"{key} {format_number(value)}" for key, value in per_head.items())]
    if skipped:
        lines += ["", "Skipped (their weights or packages are missing on this machine):"]
        lines += [f"- {name}: {reason}" for name, reason in skipped.items()]
    return "\n".join(lines) + "\n"


def format_number(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.4f}"


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, float | None]:
    """Evaluate; returns the contents of metrics.json (on every process)."""
    args = parse_args(argv)
    names, explicit = parse_metrics(args.metrics)
    accelerator = Accelerator()

    # A Hub id has at most one "/"; anything else is a local path, which must exist.
    looks_local = args.model.startswith((".", "/", "~")) or args.model.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(args.model)):
        raise ValueError(
            f"--model {args.model!r} is not an existing folder (nor a Hub repo id 'owner/name'): pass the folder "
            f"written by save_pretrained or a Hub model id"
        )
    model = OptVQModel.from_pretrained(args.model).to(accelerator.device).eval()
    if model.config.out_channels != model.config.in_channels:
        raise ValueError(
            f"the model maps {model.config.in_channels} to {model.config.out_channels} channels; reconstruction "
            "metrics need equal input and output channels"
        )
    processor = build_processor(args.model, model, args.resample)
    with accelerator.main_process_first():  # one process downloads datasets and metric weights, the others reuse
        dataset, split = load_image_dataset(
            args.dataset_name, args.data_dir, args.split, args.dataset_config_name, args.max_samples
        )
        image_column = find_image_column(dataset, args.image_column)
        metrics, skipped = build_metrics(names, explicit, model, accelerator.device)
    dataset = dataset.select_columns([image_column])
    if isinstance(dataset.features[image_column], datasets.Image):
        # Decoded by `to_pil` in the loader instead, so that an unreadable file raises an error naming it.
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    images = ImageList(dataset, image_column, name=f"split {split!r} of {args.data_dir or args.dataset_name!r}")
    dataloader = DataLoader(
        ValidationImages(images, processor), batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers
    )
    dataloader = accelerator.prepare(dataloader)  # shards batches over processes; the model stays unwrapped

    computed, grid_originals, grid_reconstructions = evaluate(
        model, dataloader, metrics, accelerator, args.num_grid_images
    )
    results = {name: _json_number(computed[name]) for name in metrics.metrics}
    per_head = {key: value for key, value in computed.items() if "_head" in key}

    if accelerator.is_main_process:
        output_dir = Path(args.output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "metrics.json").write_text(json.dumps(results, indent=2) + "\n")
        config = model.config
        context = {
            "model": f"`{args.model}` ({config.num_heads} heads x {config.num_codes} codes, eval assignment "
            f"'{getattr(config, 'inference_assignment', 'nearest')}')",
            "data": f"`{args.data_dir or args.dataset_name}`, split `{split}`, {metrics.num_images} images "
            f"(each counted once over {accelerator.num_processes} process(es))",
            "preprocessing": f"shorter side resized to {config.resolution} ({processor.resample}), center crop "
            f"{config.resolution}x{config.resolution}; reconstructions clamped to [-1, 1]",
        }
        report = markdown_report({n: computed[n] for n in metrics.metrics}, per_head, skipped, context)
        (output_dir / "metrics.md").write_text(report)
        if len(grid_originals):
            save_grid(grid_originals, grid_reconstructions, processor, output_dir / GRID_FILENAME)
        print(report)
        written = ["metrics.json", "metrics.md"] + ([GRID_FILENAME] if len(grid_originals) else [])
        print(f"wrote {', '.join(written)} to {output_dir}")
    accelerator.wait_for_everyone()
    return results


def _json_number(value: float) -> float | None:
    # JSON has no NaN: an undefined metric (rFID of one image) is written as null.
    return None if not math.isfinite(value) else float(value)


if __name__ == "__main__":
    main()
