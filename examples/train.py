#!/usr/bin/env python
"""
Train an OptVQ image tokenizer with Accelerate: one process, several GPUs or several nodes, with no code change.

Launch (from the repository root):

    # the offline default: a tiny tokenizer on scikit-image's sample photos, on CPU (or `make demo`)
    accelerate launch examples/train.py

    # one GPU
    accelerate launch --num_processes 1 examples/train.py --config examples/configs/imagenet_16x16x4.yaml \\
        --output_dir optvq-imagenet

    # 8 GPUs of one machine (train_batch_size is per GPU: 8 GPUs x 8 images = the paper's batch of 64)
    accelerate launch --multi_gpu --num_processes 8 examples/train.py \\
        --config examples/configs/imagenet_16x16x4.yaml --output_dir optvq-imagenet

    # 2 nodes of 8 GPUs: the same command on each node, with its own --machine_rank (0 on the main node)
    accelerate launch --multi_gpu --num_machines 2 --num_processes 16 --machine_rank 0 \\
        --main_process_ip 10.0.0.1 --main_process_port 29500 \\
        examples/train.py --config examples/configs/imagenet_16x16x4.yaml --output_dir /shared/optvq-imagenet

    # continue an interrupted run from its newest complete checkpoint (same command plus)
    ... --resume_from_checkpoint latest

    # 2 processes on CPU, to try the distributed path without GPUs
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/train.py --max_train_steps 20

    # fine-tune a converted or saved tokenizer on your images (architecture from the model, see configs/finetune.yaml)
    accelerate launch examples/train.py --config examples/configs/finetune.yaml \\
        --pretrained_model_name_or_path optvq-hf-run --train_data_dir my-images --output_dir optvq-finetuned

Preemption: SIGTERM or SIGINT lets the step finish, writes a complete checkpoint and exits with 128 + the signal;
rerun with --resume_from_checkpoint latest. Under `accelerate launch` the trainer also receives SIGTERM when the
launcher dies (the single-process launcher forwards no signal; torchrun forwards SIGTERM itself).

`accelerate config` can store the launch settings instead of the flags; `torchrun --nproc_per_node 8
examples/train.py ...` works as well. A launch whose processes do not form one distributed group is refused.

Configuration: `--config file.yaml` (default: examples/configs/tiny.yaml) holds the fields of `TrainingConfig`
below, a `model:` section of `OptVQConfig` fields and a `loss:` section of `OptVQLossConfig` fields. Every field can
be overridden on the command line: `--learning_rate 1e-4`, `--model.num_codes 1024`, `--loss.disc_start 0`
(`--resolution` is `--model.resolution`). Unknown fields and values of the wrong type stop the run before training.

One training step (= one optimizer update) of the global batch (train_batch_size x processes x
gradient_accumulation_steps images):
  1. autoencoder: reconstruct, `OptVQLoss.generator_loss` (L1 + L2 + perceptual + quantizer, plus the adaptive
     adversarial term from `loss.disc_start`), backward, clip, AdamW step, learning-rate step, EMA update;
  2. discriminator: hinge loss on the real images and the (detached) reconstructions of step 1, backward, clip,
     AdamW step. The original recomputes the reconstructions with the updated autoencoder; reusing them saves a
     forward pass.
The quantizer assigns codes by Sinkhorn over the global batch: its marginals are summed over all processes.

Outputs in --output_dir: the tokenizer (`OptVQModel.from_pretrained(output_dir)`, with its image processor), `ema/`
(with --use_ema), `checkpoint-<step>/` (resumable state, and a model folder: `OptVQModel.from_pretrained` and
`examples/evaluate.py --model` open it), `samples/reconstruction-<step>.png` (originals above,
reconstructions below), `reconstruction.png`, `report.json` / `report.md` (validation PSNR, L1, codebook usage and
perplexity per head), `training_config.yaml` and `logs/` (tensorboard).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import PIL.Image
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from optvq_hf import OptVQConfig, OptVQImageProcessor, OptVQModel
from optvq_hf.metrics import ReconstructionMetrics, codebook_usage, perplexity
from optvq_hf.training.checkpointing import (
    load_checkpoint_state,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from optvq_hf.training.cli import option, parse_options
from optvq_hf.training.codebook_init import kmeans_init_codebook
from optvq_hf.training.data import (
    ImageList,
    RandomCropTransform,
    StreamingTrainBatches,
    TrainBatches,
    TrainImages,
    ValidationImages,
    check_images,
    load_image_splits,
    shard_stream,
)
from optvq_hf.training.images import reconstruction_grid as images_grid
from optvq_hf.training.launch import StopRequest, check_process_group, stop_with_launcher
from optvq_hf.training.losses import OptVQLoss, OptVQLossConfig

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "tiny.yaml"
LR_SCHEDULERS = ("constant", "one_cycle", "cosine", "linear")
DECAYED_LAYERS = (torch.nn.Conv2d, torch.nn.ConvTranspose2d, torch.nn.Linear)  # weight decay on their weights only


# ---------------------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingConfig:
    """Every option of a run. `model` holds `OptVQConfig` fields, `loss` holds `OptVQLossConfig` fields."""

    # -- data
    dataset_name: str | None = option(None, "a Hub dataset, or builtin:skimage-photos / builtin:digits (offline)")
    dataset_config_name: str | None = option(None, "the configuration of dataset_name")
    train_data_dir: str | None = option(None, "a local folder of images (an imagefolder)")
    image_column: str = option("image", "the column that holds the images")
    train_split: str = option("train", "the split to train on")
    validation_split: str | None = option(None, "default: validation, else test, else held out from train")
    num_validation_images: int = option(256, "images validated (held out from train if there is no split)")
    streaming: bool = option(False, "stream the dataset instead of downloading it (needs max_train_steps)")
    shuffle_buffer_size: int = option(1000, "shuffle buffer of a streamed dataset")
    dataset_repeats: int = option(1, "an epoch goes this many times over the images")
    train_crop_scale: list[float] = option([1.0, 1.0], "random crop area, fraction of the shorter side^2")
    random_flip: bool = option(True, "random horizontal flips of the training crops")
    dataloader_num_workers: int = option(0, "loader processes (threads when streaming)")
    image_check_count: int = option(64, "images of each split decoded before training (-1: all)")
    cache_dir: str | None = option(None, "cache folder of downloaded datasets")
    # -- model and objective
    pretrained_model_name_or_path: str | None = option(
        None,
        "start from these weights and their config: a Hub id or a folder (a converted checkpoint, an earlier run's "
        "output_dir or checkpoint-<step>, an ema/ folder); model fields may only change training-time settings",
    )
    model: dict = option({}, "OptVQConfig fields")
    loss: dict = option({}, "OptVQLossConfig fields")
    # -- optimisation
    seed: int = option(42, "seed of the weights, data order, crops and flips")
    max_train_steps: int | None = option(None, "optimizer steps (default: num_train_epochs epochs)")
    num_train_epochs: int = option(1, "epochs, when max_train_steps is not set")
    train_batch_size: int = option(8, "images per process and micro-batch")
    gradient_accumulation_steps: int = option(1, "micro-batches per optimizer step")
    learning_rate: float = option(1e-4, "AdamW learning rate (autoencoder and discriminator)")
    scale_lr: bool = option(False, "multiply learning_rate by the global batch (the original's rule)")
    codebook_lr_multiplier: float = option(1.0, "learning-rate factor of the quantizer's parameters")
    adam_beta1: float = option(0.9, "AdamW beta1")
    adam_beta2: float = option(0.999, "AdamW beta2")
    adam_epsilon: float = option(1e-7, "AdamW epsilon")
    adam_weight_decay: float = option(0.05, "on convolution and linear weights only")
    lr_scheduler: str = option("constant", f"one of {LR_SCHEDULERS}")
    lr_warmup_steps: int = option(0, "linear warm-up steps (constant, cosine, linear)")
    one_cycle_pct_start: float = option(0.01, "warm-up fraction of one_cycle")
    max_grad_norm: float = option(1.0, "0: no clipping")
    mixed_precision: str | None = option(None, "no, fp16 or bf16 (default: accelerate's setting)")
    use_ema: bool = option(False, "keep an EMA of the weights, saved to ema/")
    ema_decay: float = option(0.999, "decay of the EMA")
    kmeans_init: bool = option(False, "initialise the codebook by k-means on encoder features")
    kmeans_init_batches: int = option(8, "batches of encoder features for k-means")
    kmeans_iterations: int = option(20, "Lloyd iterations of the k-means init")
    sync_batchnorm: bool = option(True, "discriminator SyncBatchNorm on several GPUs")
    gradient_checkpointing: bool = option(False, "recompute encoder/decoder activations in backward: less memory")
    allow_tf32: bool = option(False, "TF32 matmuls and convolutions on Ampere+ GPUs (faster, ~1e-3 relative error)")
    max_train_samples: int | None = option(None, "train on the first N images only (quick trials, debugging)")
    # -- outputs
    output_dir: str = option("optvq-output", "where the model, checkpoints and report go")
    checkpointing_steps: int = option(500, "steps between checkpoints (always at the end)")
    checkpoints_total_limit: int | None = option(None, "keep this many newest checkpoints")
    resume_from_checkpoint: str | None = option(None, "'latest' or a checkpoint folder")
    report_to: str = option("tensorboard", "tensorboard, wandb, all or none")
    tracker_project_name: str = option("optvq", "project name of the tracker run")
    logging_steps: int = option(10, "window of the codebook usage and images/s")
    image_logging_steps: int = option(500, "steps between reconstruction grids")
    validation_steps: int | None = option(None, "steps between validations (always at the end)")
    validation_batch_size: int | None = option(None, "default: train_batch_size")
    num_grid_images: int = option(8, "images of the reconstruction grids (PNG files and tracker images)")
    push_to_hub: bool = option(False, "upload the final model, its processor and a model card to the Hub")
    hub_model_id: str | None = option(None, "the Hub repo to push to (default: the name of output_dir)")
    hub_token: str | None = option(None, "a Hub token (default: the logged-in one)")
    hub_private: bool | None = option(None, "create the repo private")
    hub_dry_run: bool = option(False, "with push_to_hub: write the card and list the files, upload nothing")

    def __post_init__(self) -> None:
        positive = (
            "num_validation_images",
            "dataset_repeats",
            "num_train_epochs",
            "train_batch_size",
            "gradient_accumulation_steps",
            "checkpointing_steps",
            "logging_steps",
            "image_logging_steps",
            "kmeans_init_batches",
            "kmeans_iterations",
            "shuffle_buffer_size",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "max_train_steps",
            "max_train_samples",
            "validation_steps",
            "validation_batch_size",
            "checkpoints_total_limit",
        ):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 or null, got {getattr(self, name)}")
        for name in ("learning_rate", "adam_epsilon"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "adam_weight_decay",
            "max_grad_norm",
            "codebook_lr_multiplier",
            "lr_warmup_steps",
            "dataloader_num_workers",
            "num_grid_images",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2", "ema_decay", "one_cycle_pct_start"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        choices = {
            "lr_scheduler": LR_SCHEDULERS,
            "report_to": ("tensorboard", "wandb", "all", "none"),
            "mixed_precision": (None, "no", "fp16", "bf16"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if len(self.train_crop_scale) != 2:
            raise ValueError(f"train_crop_scale must be [low, high], got {self.train_crop_scale}")
        if self.streaming and self.max_train_steps is None:
            raise ValueError("a streamed dataset has no known length: set max_train_steps")

    def model_config(self) -> OptVQConfig:
        if self.pretrained_model_name_or_path is None:
            return OptVQConfig(**self.model)
        return pretrained_model_config(self.pretrained_model_name_or_path, self.model)

    def loss_config(self) -> OptVQLossConfig:
        return OptVQLossConfig(**self.loss)


LOSS_WEIGHTS_FILE = "loss_weights.safetensors"  # written by `python -m optvq_hf.conversion ... --save_loss_weights`


def load_loss_weights(loss_fn: OptVQLoss, name_or_path: str, accelerator: Accelerator) -> bool:
    """The discriminator of a converted model's `loss_weights.safetensors` (original names `loss.discriminator.*`),
    so that a fine-tuning run has its GAN term from step 0; returns whether the file was found. The LPIPS network
    keeps the weights `OptVQLoss` loads itself (the same published VGG/LPIPS weights)."""
    from safetensors.torch import load_file

    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, LOSS_WEIGHTS_FILE)
        if not os.path.isfile(path):
            return False
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

        try:
            path = hf_hub_download(name_or_path, LOSS_WEIGHTS_FILE)
        except EntryNotFoundError:
            return False
    prefix = "loss.discriminator."
    weights = {k[len(prefix) :]: v for k, v in load_file(path).items() if k.startswith(prefix)}
    if not weights:
        return False
    try:
        loss_fn.discriminator.load_state_dict(weights)
    except RuntimeError as error:
        raise ValueError(
            f"the discriminator of {path} does not fit loss.disc_base_channels / loss.disc_num_layers of this run; "
            f"set them to the converted model's values ({error})"
        ) from error
    accelerator.print(f"Discriminator weights from {path}")
    return True


# OptVQConfig fields that change how a model trains or assigns codes, not its weights: a fine-tuning run may set them.
TRAINING_TIME_FIELDS = (
    "inference_assignment",
    "sinkhorn_epsilon",
    "sinkhorn_iterations",
    "sinkhorn_chunk_size",
    "cost_normalization",
    "commitment_beta",
    "dropout",
    "initializer_range",
)


def pretrained_model_config(name_or_path: str, overrides: dict) -> OptVQConfig:
    """The config of a pretrained model with the training-time fields of `overrides`; an architecture field of
    `overrides` that differs from the pretrained value is a `ValueError` naming both."""
    pretrained = OptVQConfig.from_pretrained(name_or_path)
    values = pretrained.to_dict()
    for name, value in overrides.items():
        if name not in values:
            OptVQConfig(**{name: value})  # an unknown field: OptVQConfig's own error
        current = values[name]
        same = list(current) == list(value) if isinstance(current, (list, tuple)) else current == value
        if name in TRAINING_TIME_FIELDS:
            values[name] = value
        elif not same:
            raise ValueError(
                f"model.{name}={value!r} contradicts the pretrained model {name_or_path} ({name}={current!r}): "
                f"drop it to fine-tune that architecture (only {', '.join(TRAINING_TIME_FIELDS)} may change)"
            )
    for key in ("architectures", "transformers_version", "_name_or_path", "model_type", "auto_map"):
        values.pop(key, None)
    return OptVQConfig(**{k: v for k, v in values.items() if not k.startswith("_")})


SECTIONS = {"model": OptVQConfig, "loss": OptVQLossConfig}  # nested sections of the YAML file


def parse_args(argv: list[str] | None = None) -> TrainingConfig:
    """`--config file.yaml` plus `--field value` overrides (`--model.field`, `--loss.field` for the sections)."""
    return parse_options(
        TrainingConfig, argv, sections=SECTIONS, default_config=DEFAULT_CONFIG, description=__doc__.split("\n\n")[0]
    )


# ---------------------------------------------------------------------------------------------------------------------
# Pieces of the loop
# ---------------------------------------------------------------------------------------------------------------------
def build_optimizer(
    modules: list[torch.nn.Module], config: TrainingConfig, lr: float, codebook_lr: float | None = None
) -> torch.optim.AdamW:
    """AdamW as in the original: weight decay on convolution / linear weights only (not on biases, norms, codebook);
    the quantizer's parameters at `codebook_lr` if given."""
    decay, no_decay, codebook = [], [], []
    for module in modules:
        for submodule in module.modules():
            for name, parameter in submodule.named_parameters(recurse=False):
                if not parameter.requires_grad:
                    continue
                if codebook_lr is not None and _is_quantizer_parameter(module, parameter):
                    codebook.append(parameter)
                elif name == "weight" and isinstance(submodule, DECAYED_LAYERS):
                    decay.append(parameter)
                else:
                    no_decay.append(parameter)
    groups = [
        {"params": decay, "weight_decay": config.adam_weight_decay, "lr": lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": lr},
    ]
    if codebook:
        groups.append({"params": codebook, "weight_decay": 0.0, "lr": codebook_lr})
    return torch.optim.AdamW(
        [group for group in groups if group["params"]],
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
    )


def _is_quantizer_parameter(module: torch.nn.Module, parameter: torch.nn.Parameter) -> bool:
    quantizer = getattr(module, "quantizer", None)
    return quantizer is not None and any(parameter is p for p in quantizer.parameters())


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainingConfig, total_steps: int):
    """Learning rate per optimizer step. `one_cycle` is the original's OneCycleLR (cosine warm-up over
    `one_cycle_pct_start` of the run, then cosine decay), without its cycling of Adam's beta1."""
    if config.lr_scheduler == "one_cycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=total_steps,
            pct_start=config.one_cycle_pct_start,
            anneal_strategy="cos",
            cycle_momentum=False,
        )
    from diffusers.optimization import get_scheduler

    name = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
    return get_scheduler(name, optimizer, num_warmup_steps=config.lr_warmup_steps, num_training_steps=total_steps)


class CodeCounter:
    """Histogram of the codes used per head over a window of steps (codebook usage and perplexity)."""

    def __init__(self, num_heads: int, num_codes: int, device: torch.device):
        self.counts = torch.zeros(num_heads, num_codes, dtype=torch.int64, device=device)

    def add(self, indices: torch.Tensor) -> None:
        num_heads, num_codes = self.counts.shape
        flat = indices.detach().transpose(0, 1).reshape(num_heads, -1)  # (B, heads, h, w) -> (heads, B*h*w)
        offsets = torch.arange(num_heads, device=flat.device).unsqueeze(1) * num_codes
        self.counts += torch.bincount((flat + offsets).flatten(), minlength=num_heads * num_codes).view_as(self.counts)

    def summary(self, accelerator: Accelerator) -> dict[str, float]:
        counts = accelerator.reduce(self.counts.clone(), reduction="sum")
        self.counts.zero_()
        result = {"usage": float(codebook_usage(counts.sum(0))), "perplexity": float(perplexity(counts.sum(0)))}
        for head, (usage, ppl) in enumerate(zip(codebook_usage(counts).tolist(), perplexity(counts).tolist())):
            result[f"usage_head{head}"], result[f"perplexity_head{head}"] = usage, ppl
        return result


@torch.no_grad()
def validate(model: OptVQModel, loader, accelerator: Accelerator) -> dict[str, float]:
    """Validation metrics over every process's shard: PSNR (Y channel as the original's evaluation, and RGB), L1,
    codebook usage and perplexity (overall and per head). Eval mode: nearest-code assignment, no collective."""
    config = model.config
    names = ("psnr_rgb", "usage", "perplexity") + (("psnr",) if config.in_channels == 3 else ())
    metrics = ReconstructionMetrics(
        names, num_codes=config.num_codes, num_heads=config.num_heads, device=accelerator.device
    )
    l1_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)  # |error| in [0, 1] units
    l1_count = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    was_training = model.training
    model.eval()
    for pixel_values in loader:
        pixel_values = pixel_values.to(accelerator.device)
        output = model(pixel_values)
        reconstruction = output.reconstruction.float().clamp(-1, 1)
        metrics.update(pixel_values, reconstruction, output.indices)
        l1_sum += (reconstruction - pixel_values).abs().sum().double() / 2  # [-1, 1] -> [0, 1] units
        l1_count += pixel_values.numel()
    model.train(was_training)
    metrics.sync(accelerator)
    l1_sum, l1_count = accelerator.reduce(torch.stack([l1_sum, l1_count]), reduction="sum")
    results = metrics.compute()
    if "psnr" not in results:  # one channel: the Y channel is the image
        results["psnr"] = results["psnr_rgb"]
    results["l1"] = float(l1_sum / l1_count)
    return results


@torch.no_grad()
def reconstruction_grid(model: OptVQModel, images: torch.Tensor) -> PIL.Image.Image:
    """Originals on the top row, reconstructions below (eval mode)."""
    was_training = model.training
    model.eval()
    reconstruction = model(images.to(model.device)).reconstruction.float().clamp(-1, 1).cpu()
    model.train(was_training)
    return images_grid(images, reconstruction, pad=0)


def log_grid(accelerator: Accelerator, grid: PIL.Image.Image, step: int) -> None:
    """The reconstruction grid as an image of every tracker (tensorboard: an image summary; wandb: a wandb.Image)."""
    import numpy as np

    array = np.asarray(grid.convert("RGB"))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("reconstructions", array, global_step=step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {"reconstructions": wandb.Image(grid, caption="originals above, reconstructions below")}, step=step
            )


def push_model(config: TrainingConfig, output_dir: Path, model: OptVQModel, report: dict):
    """A model card (`optvq_hf.hub.render_model_card`) as README.md, then the folder to the Hub (without
    checkpoints and logs); `hub_dry_run` lists the files instead of uploading them."""
    from optvq_hf.hub import DEFAULT_UPLOAD_IGNORE, Evaluation, push_folder_to_hub, render_model_card

    repo_id = config.hub_model_id or output_dir.resolve().name
    results = report["validation"]["model"]
    base = config.pretrained_model_name_or_path
    card = render_model_card(
        model.config,
        repo_id=repo_id,
        summary=f"An OptVQ image tokenizer trained with examples/train.py on {report['dataset']}.",
        evaluation=Evaluation(
            metrics={name: results[name] for name in ("psnr", "psnr_rgb", "usage", "perplexity")},
            dataset=report["dataset"],
            num_images=report["num_validation_images"],
            is_hub_dataset=False,
        ),
        training_details={
            "steps": report["global_step"],
            "global batch size": report["global_batch_size"],
            "learning rate": config.learning_rate,
            "processes": report["num_processes"],
            **({"fine-tuned from": base} if base else {}),
        },
        num_parameters=report["num_parameters"],
        base_model=base if base and not os.path.isdir(base) else None,
    )
    card.save(output_dir / "README.md")
    return push_folder_to_hub(
        output_dir,
        repo_id,
        dry_run=config.hub_dry_run,
        private=config.hub_private,
        token=config.hub_token,
        ignore_patterns=(*DEFAULT_UPLOAD_IGNORE, "samples/*", ".tmp*"),
    )


def check_trackers(report_to: str) -> None:
    """A `ValueError` naming the package to install when a requested tracker is missing."""
    from accelerate.utils import is_tensorboard_available, is_wandb_available

    wanted = {"all": ("tensorboard", "wandb"), "none": ()}.get(report_to, (report_to,))
    available = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available()}
    missing = [name for name in wanted if not available[name]]
    if missing:
        raise ValueError(
            f"report_to={report_to!r} needs {' and '.join(missing)}: pip install {' '.join(missing)} "
            f"(or pass --report_to none)"
        )


CURVES_FILENAME = "training_curves.png"


def plot_curves(path: Path, history: dict[str, list[tuple[int, float]]]) -> bool:
    """Training loss, codebook usage (training window) and validation PSNR against steps, one panel each, as a PNG;
    False (and no file) without matplotlib (`pip install optvq-hf[demo]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display: files only
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = (("loss", "training loss"), ("usage", "codebook usage (training)"), ("psnr", "validation PSNR (dB, Y)"))
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, (key, title) in zip(axes, panels):
        points = history.get(key, [])
        if points:
            steps, values = zip(*points)
            axis.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3)
        axis.set_title(title)
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def write_report(output_dir: Path, report: dict) -> None:
    """report.json (everything) and report.md (the numbers people read)."""
    with open(output_dir / "report.json", "w") as handle:
        json.dump(report, handle, indent=2)
    lines = [
        "# OptVQ training report",
        "",
        f"- data: {report['dataset']}",
        f"- steps: {report['global_step']} (this run: {report['steps_this_run']}, {report['train_wall_time_s']:.1f} s "
        f"of training, {report['images_per_second']:.1f} images/s), global batch {report['global_batch_size']}",
        f"- model: {report['num_parameters']:,} parameters, {report['num_heads']} heads x {report['num_codes']} codes",
        f"- validation: {report['num_validation_images']} images at {report['resolution']}x{report['resolution']}",
        "",
        "| weights | PSNR (dB, Y) | PSNR (dB, RGB) | L1 | codebook usage | perplexity |",
        "|---|---|---|---|---|---|",
    ]
    for name, results in report["validation"].items():
        lines.append(
            f"| {name} | {results['psnr']:.2f} | {results['psnr_rgb']:.2f} | {results['l1']:.4f} | "
            f"{results['usage']:.3f} | {results['perplexity']:.1f} |"
        )
    if report.get("curves"):
        lines += ["", f"![training loss, codebook usage and validation PSNR against steps]({report['curves']})"]
    lines += ["", "Per head (model weights):", "", "| head | usage | perplexity |", "|---|---|---|"]
    model_results = report["validation"]["model"]
    for head in range(report["num_heads"]):
        lines.append(
            f"| {head} | {model_results[f'usage_head{head}']:.3f} | {model_results[f'perplexity_head{head}']:.1f} |"
        )
    lines += [
        "",
        "PSNR: per image, data range 1, on the Y channel of YCbCr (BT.601; the original's evaluation) and on RGB; "
        "L1: mean absolute error in [0, 1] pixel units; reconstructions clamped to [0, 1]. Codebook usage: fraction "
        "of the codes used at least once over the validation images (all heads, shared codebook); perplexity: "
        "exp(entropy) of the code frequencies. Eval mode: nearest-code assignment.",
    ]
    (output_dir / "report.md").write_text("\n".join(lines) + "\n")


def model_files_hook(accelerator: Accelerator, processor: OptVQImageProcessor):
    """A `save_state` pre-hook that makes every checkpoint folder a model folder: `save_state` writes the
    tokenizer's weights as `model.safetensors` (its first prepared model, the keys of `state_dict()`); the hook adds
    `config.json` and `preprocessor_config.json` next to them, so `OptVQModel.from_pretrained("checkpoint-<step>")`
    and `examples/evaluate.py --model checkpoint-<step>` open it. Loading needs no hook: `load_state` reads the same
    weights file."""

    def hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        tokenizers = [m for m in map(accelerator.unwrap_model, models) if isinstance(m, OptVQModel)]
        if tokenizers:
            os.makedirs(output_dir, exist_ok=True)
            tokenizers[0].config.save_pretrained(output_dir)
            processor.save_pretrained(output_dir)

    return hook


# Fields whose effect the restored optimizer / scheduler / data state fixes: changing them on resume would be printed
# and recorded in training_config.yaml but not applied, so a resume with other values is refused.
RESTORED_FIELDS = (
    "seed",
    "max_train_steps",
    "num_train_epochs",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "scale_lr",
    "codebook_lr_multiplier",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "adam_weight_decay",
    "lr_scheduler",
    "lr_warmup_steps",
    "one_cycle_pct_start",
    "use_ema",
    "ema_decay",
    "dataset_name",
    "dataset_config_name",
    "train_data_dir",
    "dataset_repeats",
    "streaming",
)


def check_resume_overrides(saved: dict, current: dict, checkpoint: str) -> None:
    """A `ValueError` naming every field whose value differs from the checkpoint's run where the restored state
    would silently override it (learning rate and scheduler live in the restored optimizer / scheduler, the batch
    size and data order in the restored sampler)."""
    if not saved:
        return
    # A constant learning rate does not depend on the run's length: such a run may be extended.
    extendable = ("max_train_steps", "num_train_epochs") if current.get("lr_scheduler") == "constant" else ()
    changed = [
        f"{name}: {saved[name]!r} in the checkpoint, {_plain(current[name])!r} now"
        for name in RESTORED_FIELDS
        if name in saved and name not in extendable and saved[name] != _plain(current[name])
    ]
    if changed:
        raise ValueError(
            f"resuming {checkpoint} with options its restored state overrides: "
            + "; ".join(changed)
            + ". Resume with the checkpoint's values, or start a new run (a new output_dir) to change them"
        )


def save_model_atomically(folder: Path, model: OptVQModel, processor: OptVQImageProcessor) -> None:
    """`save_pretrained` of the model and its processor into a temporary folder next to `folder`, then each file
    moved into place: a failed write (full disk) leaves no half-written file in `folder` and one error naming it."""
    import shutil
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    temporary = Path(tempfile.mkdtemp(prefix=".tmp-save-", dir=folder.parent))
    try:
        model.save_pretrained(temporary)
        processor.save_pretrained(temporary)
        for path in sorted(temporary.iterdir()):
            if path.is_file():
                os.chmod(path, 0o666 & ~_umask())  # mkdtemp's folder is private; its files get ordinary modes
                os.replace(path, folder / path.name)
    except OSError as error:
        raise OSError(error.errno, f"could not save the model into {folder}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> dict:
    config = parse_args(argv)
    model_config, loss_config = config.model_config(), config.loss_config()  # bad fields fail here, before anything
    if loss_config.disc_in_channels != model_config.out_channels:
        raise ValueError(
            f"loss.disc_in_channels ({loss_config.disc_in_channels}) must equal model.out_channels "
            f"({model_config.out_channels})"
        )
    if loss_config.perceptual_weight > 0 and model_config.out_channels != 3:
        raise ValueError("LPIPS needs RGB images: set loss.perceptual_weight to 0 for models with out_channels != 3")
    output_dir = Path(config.output_dir)
    check_trackers(config.report_to)  # accelerate would skip a missing tracker with a mere warning

    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    check_process_group(accelerator.num_processes)
    if config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_seed(config.seed)
    rank, world = accelerator.process_index, accelerator.num_processes

    # -- data: every check runs before the first step
    with accelerator.main_process_first():  # downloads once per node
        splits = load_image_splits(
            config.dataset_name,
            config.dataset_config_name,
            config.train_data_dir,
            config.image_column,
            config.train_split,
            config.validation_split,
            config.num_validation_images,
            config.streaming,
            config.seed,
            config.cache_dir,
        )
    if config.max_train_samples is not None:
        if splits.streaming:
            splits.train = splits.train.take(config.max_train_samples)
        else:
            kept = range(min(config.max_train_samples, len(splits.train)))
            images = splits.train.images
            images = images.select(kept) if hasattr(images, "select") else [images[i] for i in kept]
            splits.train = ImageList(images, splits.train.image_column, splits.train.name)
    check_images(splits.validation, config.image_check_count)
    processor = OptVQImageProcessor.from_model_config(model_config)
    transform = RandomCropTransform(
        model_config.resolution, tuple(config.train_crop_scale), config.random_flip, model_config.in_channels
    )
    if splits.streaming:
        stream = shard_stream(splits.train, rank, world, config.seed, config.shuffle_buffer_size)
        train_batches = StreamingTrainBatches(
            stream,
            splits.image_column,
            transform,
            config.train_batch_size,
            config.seed,
            rank,
            config.dataloader_num_workers,
        )
    else:
        check_images(splits.train, config.image_check_count)
        train_set = TrainImages(splits.train, transform, config.seed, config.dataset_repeats)
        train_batches = TrainBatches(
            train_set,
            config.train_batch_size,
            world,
            rank,
            config.seed,
            config.dataloader_num_workers,
            accelerator.device.type == "cuda",
        )
    validation_set = ValidationImages(splits.validation, processor)
    validation_loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(validation_set, range(rank, len(validation_set), world)),  # this process's shard
        batch_size=config.validation_batch_size or config.train_batch_size,
        num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(0),  # leaves the global random state alone
    )
    grid_images = torch.stack([validation_set[i] for i in range(min(config.num_grid_images, len(validation_set)))])

    global_batch = config.train_batch_size * world * config.gradient_accumulation_steps
    if config.max_train_steps is not None:
        max_train_steps = config.max_train_steps
    else:
        epoch_steps = train_batches.batches_per_epoch // config.gradient_accumulation_steps
        max_train_steps = config.num_train_epochs * epoch_steps
        if max_train_steps < 1:
            raise ValueError("one epoch is shorter than one step: set max_train_steps or raise num_train_epochs")

    # -- model, objective, optimizers
    model = OptVQModel(model_config)
    if config.pretrained_model_name_or_path is not None:
        pretrained = OptVQModel.from_pretrained(config.pretrained_model_name_or_path)
        model.load_state_dict(pretrained.state_dict())
        del pretrained
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    loss_fn = OptVQLoss(loss_config)
    if config.pretrained_model_name_or_path is not None:
        load_loss_weights(loss_fn, config.pretrained_model_name_or_path, accelerator)
    if config.sync_batchnorm and world > 1 and accelerator.device.type == "cuda":
        loss_fn = torch.nn.SyncBatchNorm.convert_sync_batchnorm(loss_fn)  # as the original under data parallelism
    lr = config.learning_rate * (global_batch if config.scale_lr else 1)
    optimizer = build_optimizer([model], config, lr, lr * config.codebook_lr_multiplier)
    disc_optimizer = build_optimizer([loss_fn.discriminator], config, lr)
    scheduler = build_scheduler(optimizer, config, max_train_steps)
    disc_scheduler = build_scheduler(disc_optimizer, config, max_train_steps)
    # Schedulers are not prepared: accelerate would step them once per process; here they step once per update.
    model, loss_ddp, optimizer, disc_optimizer = accelerator.prepare(model, loss_fn, optimizer, disc_optimizer)
    unwrapped = accelerator.unwrap_model(model)
    loss_module = accelerator.unwrap_model(loss_ddp)

    # -- resume, or start (optionally from a k-means codebook)
    checkpoint = broadcast_object_list([resolve_checkpoint(config.resume_from_checkpoint, output_dir)])[0]
    if checkpoint is None and config.kmeans_init:
        source = (
            train_batches
            if splits.streaming
            else TrainBatches(train_set, config.train_batch_size, world, rank, config.seed + 1)
        )
        first = [batch for batch, _ in zip(source, range(config.kmeans_init_batches))]
        kmeans_init_codebook(unwrapped, first, accelerator, config.kmeans_iterations, seed=config.seed)
        if splits.streaming:
            train_batches.load_state_dict({"epoch": 0, "position": 0})
    ema = None
    if config.use_ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(unwrapped.parameters(), decay=config.ema_decay)
    accelerator.register_for_checkpointing(scheduler, disc_scheduler, *([ema] if ema is not None else []))
    accelerator.register_save_state_pre_hook(model_files_hook(accelerator, processor))
    global_step = 0
    if checkpoint is not None:
        accelerator.print(f"Resuming from {checkpoint}")
        accelerator.load_state(checkpoint)
        state, process_state = load_checkpoint_state(checkpoint, rank)
        if process_state is None or state.get("num_processes") != world:
            raise ValueError(
                f"{checkpoint} was written by {state.get('num_processes')} processes: resume it with "
                f"as many (this launch has {world})"
            )
        check_resume_overrides(state.get("config", {}), asdict(config), checkpoint)
        global_step = int(state["global_step"])
        train_batches.load_state_dict(process_state["data"])
        if ema is not None:
            ema.to(accelerator.device)
    elif config.resume_from_checkpoint == "latest":
        accelerator.print(f"No checkpoint in {output_dir} yet: starting a new run")

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "samples").mkdir(exist_ok=True)
        with open(output_dir / "training_config.yaml", "w") as handle:
            yaml.safe_dump(_plain(asdict(config)), handle, sort_keys=False)
    if config.report_to != "none":
        accelerator.init_trackers(config.tracker_project_name, config=_flat_hparams(asdict(config)))

    accelerator.print(
        f"Training {sum(p.numel() for p in unwrapped.parameters()):,} parameters on {splits.description}\n"
        f"  {max_train_steps} steps of {global_batch} images ({config.train_batch_size} per process x {world} "
        f"processes x {config.gradient_accumulation_steps} accumulation), learning rate {lr:g}, "
        f"from step {global_step}"
    )
    counter = CodeCounter(model_config.num_heads, model_config.num_codes, accelerator.device)
    progress = tqdm(
        total=max_train_steps,
        initial=global_step,
        disable=not accelerator.is_local_main_process,
        desc="steps",
        dynamic_ncols=True,
    )
    batches = iter(train_batches)
    start_step, window_start, train_start = global_step, time.perf_counter(), time.perf_counter()
    first_logs: dict[str, float] = {}
    history: dict[str, list[tuple[int, float]]] = {"loss": [], "usage": [], "psnr": []}  # this run's curves
    last_logs: dict[str, float] = {}

    stop = StopRequest()
    stop_with_launcher()
    try:
        while global_step < max_train_steps:
            # 1. autoencoder: accumulate the gradients of the global batch, then one update
            micro_batches, reconstructions = [], []
            for micro in range(config.gradient_accumulation_steps):
                pixel_values = next(batches).to(accelerator.device, non_blocking=True)
                last = micro == config.gradient_accumulation_steps - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
                    output = model(pixel_values)
                    loss, logs = loss_module.generator_loss(
                        pixel_values,
                        output.reconstruction,
                        output.quantizer_loss,
                        global_step,
                        last_layer=unwrapped.get_last_layer(),
                    )
                accelerator.backward(loss / config.gradient_accumulation_steps)
                counter.add(output.indices)
                micro_batches.append(pixel_values)
                reconstructions.append(output.reconstruction.detach())
            if config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(unwrapped.parameters())

            # 2. discriminator, on the same images and their reconstructions (its learning rate moves when it trains)
            if loss_module.discriminator_trains(global_step):
                for micro, (pixel_values, reconstruction) in enumerate(zip(micro_batches, reconstructions)):
                    last = micro == config.gradient_accumulation_steps - 1
                    with contextlib.nullcontext() if last else accelerator.no_sync(loss_ddp), accelerator.autocast():
                        disc_loss, disc_logs = loss_ddp("discriminator", pixel_values, reconstruction, global_step)
                    accelerator.backward(disc_loss / config.gradient_accumulation_steps)
                if config.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(loss_ddp.parameters(), config.max_grad_norm)
                disc_optimizer.step()
                disc_scheduler.step()
                disc_optimizer.zero_grad(set_to_none=True)
                logs.update(disc_logs)
            global_step += 1
            progress.update(1)

            # 3. logs, pictures, validation, checkpoints
            logs["lr"] = scheduler.get_last_lr()[0]
            if global_step % config.logging_steps == 0 or global_step == max_train_steps:
                usage = counter.summary(accelerator)  # a collective: every process calls it
                elapsed = time.perf_counter() - window_start
                steps_in_window = (global_step - start_step) % config.logging_steps or config.logging_steps
                logs.update({f"train_{k}": v for k, v in usage.items()})
                logs["images_per_second"] = steps_in_window * global_batch / max(elapsed, 1e-9)
                window_start = time.perf_counter()
                history["loss"].append((global_step, float(logs["loss"])))  # once per logging window, not per step
                history["usage"].append((global_step, usage["usage"]))
                progress.set_postfix(
                    loss=f"{logs['loss']:.4f}", usage=f"{usage['usage']:.2f}", img_s=f"{logs['images_per_second']:.1f}"
                )
            accelerator.log(logs, step=global_step)
            first_logs, last_logs = first_logs or logs, logs
            if global_step % config.image_logging_steps == 0 and accelerator.is_main_process:
                grid = reconstruction_grid(unwrapped, grid_images)
                grid.save(output_dir / "samples" / f"reconstruction-{global_step}.png")
                log_grid(accelerator, grid, global_step)
            validating = config.validation_steps and global_step % config.validation_steps == 0
            if validating and global_step < max_train_steps:
                results = validate(unwrapped, validation_loader, accelerator)
                accelerator.log({f"validation_{k}": v for k, v in results.items()}, step=global_step)
                history["psnr"].append((global_step, results["psnr"]))
                accelerator.print(
                    f"step {global_step}: validation PSNR {results['psnr']:.2f} dB, "
                    f"codebook usage {results['usage']:.3f}"
                )
            stopping = stop.requested(accelerator)
            if global_step % config.checkpointing_steps == 0 or global_step == max_train_steps or stopping:
                state = {"global_step": global_step, "num_processes": world, "config": _plain(asdict(config))}
                data_state = {"data": train_batches.state_dict()}
                saved = save_checkpoint(accelerator, output_dir, global_step, state, data_state)
                if accelerator.is_main_process:
                    prune_checkpoints(output_dir, config.checkpoints_total_limit)
            if stopping:
                progress.close()
                accelerator.print(
                    f"Stopped by a signal after step {global_step} of {max_train_steps}: the complete checkpoint "
                    f"{saved} was written. Continue with the same command plus --resume_from_checkpoint latest"
                )
                accelerator.end_training()
                raise SystemExit(stop.exit_code)
    finally:  # the handlers go back also when a step raises
        stop.restore()
    progress.close()
    train_time = time.perf_counter() - train_start

    # -- the end: validate, save the tokenizer (and its EMA), write the report
    validation = {"model": validate(unwrapped, validation_loader, accelerator)}
    ema_model = None
    if ema is not None:
        ema_model = OptVQModel(model_config).to(accelerator.device)
        ema.copy_to(ema_model.parameters())
        validation["ema"] = validate(ema_model, validation_loader, accelerator)
    accelerator.log({f"validation_{k}": v for k, v in validation["model"].items()}, step=global_step)
    report = {
        "global_step": global_step,
        "steps_this_run": global_step - start_step,
        "train_wall_time_s": train_time,
        "images_per_second": (global_step - start_step) * global_batch / max(train_time, 1e-9),
        "global_batch_size": global_batch,
        "num_processes": world,
        "dataset": splits.description,
        "num_validation_images": len(validation_set),
        "resolution": model_config.resolution,
        "num_parameters": sum(p.numel() for p in unwrapped.parameters()),
        "num_heads": model_config.num_heads,
        "num_codes": model_config.num_codes,
        "validation": validation,
        "history": history,
        "first_train_logs": first_logs,
        "last_train_logs": last_logs,
    }
    if accelerator.is_main_process:
        save_model_atomically(output_dir, unwrapped, processor)
        if ema_model is not None:
            save_model_atomically(output_dir / "ema", ema_model, processor)
        reconstruction_grid(unwrapped, grid_images).save(output_dir / "reconstruction.png")
        history["psnr"].append((global_step, validation["model"]["psnr"]))
        if plot_curves(output_dir / CURVES_FILENAME, history):
            report["curves"] = CURVES_FILENAME
        write_report(output_dir, report)
        accelerator.print((output_dir / "report.md").read_text())
        if config.push_to_hub:
            push_model(config, output_dir, unwrapped, report)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report


def _plain(value):
    """Tuples -> lists, recursively (YAML and JSON friendly)."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _flat_hparams(config: dict, prefix: str = "") -> dict:
    """Trackers take flat scalars: nested sections become dotted keys, lists and None become strings."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flat_hparams(value, f"{prefix}{key}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[f"{prefix}{key}"] = value
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


if __name__ == "__main__":
    main(sys.argv[1:])
