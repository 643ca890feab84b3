#!/usr/bin/env python
"""
An autoregressive image generator on OptVQ tokens: tokenize a dataset once with a trained OptVQ tokenizer, train a
small decoder-only transformer (`LlamaForCausalLM` built from a config) on the token sequences, sample it with
`generate` (temperature, top-k, top-p; classifier-free guidance), decode the samples with the tokenizer and save a
PNG grid.

Launch (from the repository root):

    # CPU or one GPU, the offline default: scikit-learn's 8x8 handwritten digits (upsampled), class-conditional
    python examples/train_ar.py --tokenizer path/to/optvq-tokenizer --output_dir outputs/ar-digits

    # the same with the settings of a YAML file (keys are the flags below; flags given on the command line win)
    python examples/train_ar.py --config examples/configs/ar_tiny.yaml --tokenizer path/to/optvq-tokenizer

    # a Hub dataset (with a label column for class-conditional tokens) on 8 GPUs of one node
    accelerate launch --num_processes 8 examples/train_ar.py --tokenizer <org>/optvq-imagenet \
        --dataset_name <hub dataset> --label_column label --hidden_size 768 --num_layers 12 --num_attention_heads 12 \
        --batch_size 32 --max_train_steps 100000 --mixed_precision bf16

    # several nodes: the same command on every node, with accelerate's --num_machines, --machine_rank,
    # --main_process_ip and --main_process_port

The sequence of an image is `[class] [BOI] t_1 ... t_L` (or `[BOI] t_1 ... t_L` without classes). Token ids
`[0, V)` are image tokens (V = the tokenizer's vocabulary for `--vocabulary`), `V` is the begin-of-image token and
`V + 1 + c` the token of class c. The image tokens follow `optvq_hf.tokens`: `--order position-major` (default: the
`num_heads` tokens of a latent position adjacent, positions in raster order) or `head-major`; `--vocabulary shared`
(default: ids in [0, num_codes)) or `per-head` (head j uses [j * num_codes, (j + 1) * num_codes)). While sampling, a
logits processor allows at each step only the ids valid at that place of the sequence, so every sample decodes.

Classifier-free guidance (LlamaGen's): in training each class token is replaced with probability `--class_dropout`
by a null-class token (id `V + 1 + C`); `--cfg_scale s` (not 1) samples with the class prompt and the null-class
prompt as one batch and the logits `uncond + s * (cond - uncond)`, then temperature, top-k and top-p. The
position-level generator (all heads of a latent position per step) is `optvq_hf.generation.TokenGenerator`, compared
with this flat one in benchmarks/generation.py. `--token_dataset` trains from a pre-tokenized dataset
(`optvq_hf.training.token_data.load_token_dataset`) instead of tokenizing images here.

The tokenizer runs once: the token sequences are stored with `datasets.save_to_disk` under `--token_cache_dir`
(default `<output_dir>/tokens`) and reused by later runs with the same tokenizer weights, data and layout.

An image is `num_heads * (image_size / downsampling factor)^2` tokens: with the digits at 16x16, a factor-4 tokenizer
with 4 heads gives 64 tokens and the default run (500 steps of a 0.8 M-parameter transformer) takes about 3 minutes on
two CPU cores; a factor-2 tokenizer gives 256 tokens (pass `--image_size 8` for 64). On a CPU shared with other jobs,
`OMP_NUM_THREADS=1` avoids OpenMP threads waiting on each other, which can slow small models down many times.

`--output_dir` receives `samples.png` (one row per class, or a square grid without classes), `samples.safetensors`
(the sampled token ids and their classes), `reference.png` (real images of the same classes after the tokenizer's
round trip, the quality ceiling of the generator), `generator/` (the transformer, `save_pretrained`, with
`token_layout.json`) and `summary.json` (losses and timings).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from transformers import (
    DynamicCache,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    get_scheduler,
)

from optvq_hf import OptVQImageProcessor, OptVQModel, TokenLayout
from optvq_hf.generation import process_logits
from optvq_hf.tokens import ORDERS, VOCABULARIES
from optvq_hf.training.cli import option, parse_options
from optvq_hf.training.data import digits_to_pil, load_sklearn_digits
from optvq_hf.training.images import image_grid


# ---------------------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ArOptions:
    """Every option of a run; a YAML `--config` file holds the same keys, the command line wins."""

    tokenizer: str | None = option(None, "a trained OptVQ model: a save_pretrained folder or Hub id (required)")
    output_dir: str = option("outputs/ar", "where the grid, the generator and logs go")
    # -- data (default: scikit-learn's digits; else dataset_name, data_dir or token_dataset)
    dataset_name: str | None = option(None, "a `datasets` dataset on the Hub")
    dataset_config_name: str | None = option(None, "the configuration of dataset_name, if any")
    data_dir: str | None = option(None, "a local folder of images (a `datasets` imagefolder)")
    token_dataset: str | None = option(
        None,
        "a pre-tokenized dataset (optvq_hf.training.token_data.load_token_dataset: a folder or Hub id with columns "
        "tokens, label, index, variant) instead of tokenizing images here",
    )
    split: str = option("train", "the split to train on")
    image_column: str = option("image", "the column holding the images")
    label_column: str | None = option(None, "the class column (default 'label' for the digits)")
    max_train_samples: int | None = option(None, "use the first N images only")
    image_size: int | None = option(
        None,
        "side of the square images fed to the tokenizer (default: the tokenizer's resolution; for the 8x8 digits "
        "16, rounded up to a multiple of the tokenizer's downsampling factor)",
    )
    token_cache_dir: str | None = option(None, "where the token dataset is stored (<output_dir>/tokens)")
    tokenize_batch_size: int = option(64, "images per tokenizer batch")
    validation_fraction: float = option(0.1, "held-out share for the validation loss")
    # -- token layout
    order: str = option("position-major", "order of the tokens", choices=ORDERS)
    vocabulary: str = option("shared", "token ids shared by the heads or offset per head", choices=VOCABULARIES)
    class_conditional: bool = option(True, "prefix each sequence with its class token (needs a label column)")
    # -- transformer (LlamaForCausalLM)
    hidden_size: int = option(128, "width of the transformer")
    num_layers: int = option(3, "decoder layers")
    num_attention_heads: int = option(4, "attention heads")
    intermediate_size: int | None = option(None, "MLP width (default 4 * hidden_size)")
    # -- training
    batch_size: int = option(32, "sequences per batch and per process")
    gradient_accumulation_steps: int = option(1, "batches per optimizer step")
    max_train_steps: int = option(500, "optimizer steps")
    learning_rate: float = option(2e-3, "peak learning rate (AdamW, warmup then cosine decay)")
    weight_decay: float = option(0.1, "AdamW weight decay of matrices")
    warmup_steps: int = option(50, "linear warmup steps")
    max_grad_norm: float = option(1.0, "gradient clipping norm")
    mixed_precision: str = option("no", "accelerate's mixed precision", choices=("no", "fp16", "bf16"))
    seed: int = option(0, "seed of the split, the initialisation, the batches and the samples")
    log_every: int = option(100, "steps between log lines")
    eval_every: int | None = option(None, "steps between validation losses (default: end)")
    # -- sampling
    samples_per_class: int = option(10, "grid columns with classes")
    num_samples: int = option(64, "samples without classes")
    temperature: float = option(0.8, "sampling temperature")
    top_k: int = option(0, "sample among the k likeliest ids (0: all)")
    top_p: float = option(1.0, "sample among the likeliest ids of this total probability (1.0: all)")
    grid_scale: int = option(2, "integer upscaling of the saved grids")
    class_dropout: float = option(
        0.1, "probability of replacing the class token by the null-class token in training (for --cfg_scale)"
    )
    cfg_scale: float = option(
        1.0,
        "classifier-free guidance: logits uncond + scale * (cond - uncond), both branches in one batched forward "
        "(1.0: plain conditional sampling with `generate`)",
    )


def parse_args(argv: Sequence[str] | None = None) -> ArOptions:
    """`--config file.yaml` plus `--field value` overrides; every value is checked by `check_args`."""
    args = parse_options(ArOptions, argv, description=__doc__.split("\n\n")[0])
    check_args(args)
    return args


def check_args(args: ArOptions) -> None:
    """Raise a `ValueError` naming the flag for every invalid value."""
    if not args.tokenizer:
        raise ValueError("--tokenizer is required: a trained OptVQ model folder or Hub id (it decodes the samples)")
    if args.dataset_name is not None and args.data_dir is not None:
        raise ValueError("pass at most one of --dataset_name and --data_dir (neither: the digits)")
    if args.token_dataset is not None and (args.dataset_name is not None or args.data_dir is not None):
        raise ValueError("--token_dataset replaces --dataset_name / --data_dir: pass only one of them")
    positive = (
        "batch_size",
        "gradient_accumulation_steps",
        "max_train_steps",
        "hidden_size",
        "num_layers",
        "num_attention_heads",
        "tokenize_batch_size",
        "samples_per_class",
        "num_samples",
        "grid_scale",
        "log_every",
    )
    for name in positive:
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_train_samples", "image_size", "intermediate_size", "eval_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.hidden_size % args.num_attention_heads:
        raise ValueError(f"--hidden_size ({args.hidden_size}) must be divisible by --num_attention_heads")
    if not 0.0 <= args.validation_fraction < 1.0:
        raise ValueError(f"--validation_fraction must be in [0, 1), got {args.validation_fraction}")
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")
    if args.top_k < 0:
        raise ValueError(f"--top_k must be >= 0, got {args.top_k}")
    if not 0.0 <= args.class_dropout < 1.0:
        raise ValueError(f"--class_dropout must be in [0, 1), got {args.class_dropout}")
    if args.cfg_scale < 0:
        raise ValueError(f"--cfg_scale must be >= 0, got {args.cfg_scale}")
    if not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top_p must be in (0, 1], got {args.top_p}")
    if args.learning_rate <= 0 or args.warmup_steps < 0 or args.weight_decay < 0:
        raise ValueError("--learning_rate must be positive, --warmup_steps and --weight_decay non-negative")


# ---------------------------------------------------------------------------------------------------------------------
# Data and pre-tokenization
# ---------------------------------------------------------------------------------------------------------------------
def load_digits_dataset() -> datasets.Dataset:
    """scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels) as a `datasets.Dataset` with 10 classes."""
    images, targets = load_sklearn_digits()
    labels = datasets.ClassLabel(names=[str(digit) for digit in range(10)])
    features = datasets.Features({"image": datasets.Image(), "label": labels})
    return datasets.Dataset.from_dict({"image": digits_to_pil(images), "label": targets.tolist()}, features=features)


def load_images(args: ArOptions) -> datasets.Dataset:
    if args.dataset_name is not None:
        dataset = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split=args.split)
    elif args.data_dir is not None:
        dataset = datasets.load_dataset("imagefolder", data_dir=args.data_dir, split=args.split)
    else:
        dataset = load_digits_dataset()
    if args.image_column not in dataset.column_names:
        raise ValueError(f"--image_column {args.image_column!r} is not a column of the data: {dataset.column_names}")
    if args.label_column is not None and args.label_column not in dataset.column_names:
        raise ValueError(f"--label_column {args.label_column!r} is not a column of the data: {dataset.column_names}")
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    return dataset


def class_names(dataset: datasets.Dataset, label_column: str | None) -> list[str] | None:
    """Names of the classes of the label column (ClassLabel names, else the sorted distinct integer labels)."""
    if label_column is None:
        return None
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    labels = sorted(set(dataset[label_column]))
    if labels != list(range(len(labels))):
        raise ValueError(f"--label_column {label_column!r} must hold the integers 0..C-1, got {labels[:10]}...")
    return [str(label) for label in labels]


def choose_image_size(args: ArOptions, config) -> int:
    """--image_size, else 16 for the 8x8 digits (more only adds tokens), else the tokenizer's resolution."""
    factor = config.downsample_factor
    if args.image_size is not None:
        size = args.image_size
    elif args.dataset_name is None and args.data_dir is None:
        size = factor * math.ceil(16 / factor)
    else:
        size = config.resolution
    if size % factor:
        raise ValueError(f"--image_size {size} must be a multiple of the tokenizer's downsampling factor {factor}")
    return size


def tokenizer_fingerprint(tokenizer: OptVQModel) -> str:
    """A hash of the tokenizer's weights and config: cached tokens are reused only for the same tokenizer."""
    digest = hashlib.blake2b(tokenizer.config.to_json_string().encode(), digest_size=16)
    for name, tensor in sorted(tokenizer.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def pretokenize(
    args: ArOptions, tokenizer: OptVQModel, image_size: int, cache_dir: Path, device: torch.device
) -> tuple[datasets.Dataset, dict]:
    """
    The token dataset (`input_ids`, and `label` with classes), tokenized once and stored under `cache_dir`; a later
    run with the same tokenizer, data and layout loads it from disk instead.
    """
    images = load_images(args)
    names = class_names(images, args.label_column) if args.class_conditional else None
    meta = {
        "tokenizer": str(args.tokenizer),
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "data": args.dataset_name or args.data_dir or "sklearn-digits",
        "dataset_config_name": args.dataset_config_name,
        "split": args.split,
        "num_images": len(images),
        "image_size": image_size,
        "order": args.order,
        "vocabulary": args.vocabulary,
        "label_column": args.label_column if names else None,
        "class_names": names,
    }
    meta_file = cache_dir / "token_meta.json"
    if meta_file.is_file() and json.loads(meta_file.read_text()) == meta:
        return datasets.load_from_disk(str(cache_dir / "dataset")), meta

    processor = OptVQImageProcessor(resolution=image_size, num_channels=tokenizer.config.in_channels)

    def tokenize_batch(batch: dict) -> dict:
        pixel_values = processor(batch[args.image_column])["pixel_values"].to(device)
        ids = tokenizer.tokenize(pixel_values, order=args.order, vocabulary=args.vocabulary)
        out = {"input_ids": list(ids.cpu().numpy().astype(np.int32))}
        if names:
            out["label"] = batch[args.label_column]
        return out

    keep = [args.image_column] + ([args.label_column] if names else [])
    images = images.select_columns(keep)
    tokens = images.map(
        tokenize_batch,
        batched=True,
        batch_size=args.tokenize_batch_size,
        remove_columns=keep,
        new_fingerprint=hashlib.sha1(json.dumps(meta, sort_keys=True).encode()).hexdigest(),  # not a hash of the model
        desc="tokenizing",
    )
    tokens.save_to_disk(str(cache_dir / "dataset"))
    meta_file.write_text(json.dumps(meta, indent=2) + "\n")  # written last: a partial cache is never reused
    return datasets.load_from_disk(str(cache_dir / "dataset")), meta


def load_pretokenized(args: ArOptions, tokenizer: OptVQModel) -> tuple[datasets.Dataset, TokenLayout, list | None]:
    """
    The token dataset of `--token_dataset` (written by the package's token export), as `input_ids` (+ `label`), its
    layout, and class names; its layout must be the tokenizer's (same codes and heads) so that samples decode.
    """
    from optvq_hf.training.token_data import load_token_dataset  # the token export's reader

    loaded = load_token_dataset(args.token_dataset, split=args.split)
    layout = loaded.layout
    if (layout.num_codes, layout.num_heads) != (tokenizer.config.num_codes, tokenizer.config.num_heads):
        raise ValueError(
            f"--token_dataset has {layout.num_heads} heads x {layout.num_codes} codes but --tokenizer has "
            f"{tokenizer.config.num_heads} x {tokenizer.config.num_codes}: pass the tokenizer that made the tokens"
        )
    dataset = loaded.dataset
    conditional = args.class_conditional and bool(loaded.num_classes) and "label" in dataset.column_names
    dataset = dataset.select_columns(["tokens"] + (["label"] if conditional else [])).rename_column(
        "tokens", "input_ids"
    )
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    names = [str(label) for label in range(loaded.num_classes)] if conditional else None
    return dataset, layout, names


# ---------------------------------------------------------------------------------------------------------------------
# Sequences and sampling
# ---------------------------------------------------------------------------------------------------------------------
class SequenceFormat:
    """Where image tokens, the begin-of-image token and the class tokens sit in the transformer's vocabulary."""

    def __init__(self, layout: TokenLayout, num_classes: int):
        self.layout = layout
        self.num_classes = num_classes
        self.boi_id = layout.vocab_size
        self.class_offset = layout.vocab_size + 1
        # one more class token than classes: the null class of classifier-free guidance (id class_offset + C)
        self.null_class = num_classes
        self.vocab_size = layout.vocab_size + 1 + num_classes + (1 if num_classes else 0)
        self.prefix_length = 2 if num_classes else 1

    def prompts(self, labels: torch.Tensor | None, batch_size: int) -> torch.LongTensor:
        """(B, prefix_length): `[class, BOI]` per label, or `[BOI]`."""
        boi = torch.full((batch_size, 1), self.boi_id, dtype=torch.long)
        if not self.num_classes:
            return boi
        return torch.cat([labels.long().view(-1, 1) + self.class_offset, boi], dim=1)

    def sequences(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None, class_dropout: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Token sequences with their prompt, and the training labels (the prompt is not a target); with
        `class_dropout`, each label is replaced by the null class with that probability.
        """
        if labels is not None and class_dropout > 0:
            drop = torch.rand(labels.shape, device=labels.device) < class_dropout
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        sequence = torch.cat([self.prompts(labels, input_ids.shape[0]).to(input_ids.device), input_ids.long()], dim=1)
        targets = sequence.clone()
        targets[:, : self.prefix_length] = -100
        return sequence, targets

    def to_json(self) -> dict:
        return {
            "num_codes": self.layout.num_codes,
            "num_heads": self.layout.num_heads,
            "latent_shape": list(self.layout.latent_shape),
            "order": self.layout.order,
            "vocabulary": self.layout.vocabulary,
            "image_vocab_size": self.layout.vocab_size,
            "boi_id": self.boi_id,
            "class_offset": self.class_offset,
            "num_classes": self.num_classes,
            "null_class_id": self.class_offset + self.null_class if self.num_classes else None,
            "prefix_length": self.prefix_length,
        }


class ImageTokenRange(LogitsProcessor):
    """Allows, at each generated place, only the image-token ids valid there (`TokenLayout.id_bounds`)."""

    def __init__(self, layout: TokenLayout, prompt_length: int):
        self.low, self.high = layout.id_bounds()
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        place = input_ids.shape[1] - self.prompt_length
        low, high = int(self.low[place]), int(self.high[place])
        scores = scores.clone()
        scores[:, :low] = -float("inf")
        scores[:, high:] = -float("inf")
        return scores


@torch.no_grad()
def sample_tokens(
    model: LlamaForCausalLM, fmt: SequenceFormat, labels: torch.Tensor | None, num: int, args: ArOptions
) -> torch.LongTensor:
    """(num, L) image-token ids sampled with `generate`, for the given class labels (or unconditionally)."""
    if labels is not None and fmt.num_classes and args.cfg_scale != 1.0:
        return sample_tokens_cfg(model, fmt, labels, args)
    device = next(model.parameters()).device
    prompts = fmt.prompts(labels, num).to(device)
    length = fmt.layout.sequence_length
    output = model.generate(
        input_ids=prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=True,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        max_new_tokens=length,
        min_new_tokens=length,
        logits_processor=LogitsProcessorList([ImageTokenRange(fmt.layout, prompts.shape[1])]),
        pad_token_id=fmt.boi_id,  # never emitted (all sequences have the same length); silences a warning
        eos_token_id=None,
    )
    return output[:, prompts.shape[1] :].cpu()


@torch.no_grad()
def sample_tokens_cfg(
    model: LlamaForCausalLM, fmt: SequenceFormat, labels: torch.Tensor, args: ArOptions
) -> torch.LongTensor:
    """
    Classifier-free guidance as in LlamaGen: the class prompts and null-class prompts run as one batch of 2B with the
    KV cache; each step samples from `cond + (cfg_scale - 1) * (cond - uncond)` (after the layout's id mask,
    temperature, top-k, top-p) and feeds the same token to both branches.
    """
    device = next(model.parameters()).device
    batch = labels.shape[0]
    cond = fmt.prompts(labels, batch)
    uncond = fmt.prompts(torch.full_like(labels, fmt.null_class), batch)
    inputs = torch.cat([cond, uncond]).to(device)
    mask = ImageTokenRange(fmt.layout, inputs.shape[1])
    cache, generated = DynamicCache(), inputs
    for _ in range(fmt.layout.sequence_length):
        logits = model(input_ids=inputs, cache=cache, use_cache=True).logits[:, -1].float()
        logits = logits[:batch] + (args.cfg_scale - 1.0) * (logits[:batch] - logits[batch:])
        logits = process_logits(mask(generated[:batch], logits), args.temperature, args.top_k, args.top_p)
        token = torch.multinomial(torch.softmax(logits, dim=-1), 1)
        inputs = torch.cat([token, token])
        generated = torch.cat([generated, inputs], dim=1)
    return generated[:batch, cond.shape[1] :].cpu()


def decode_to_uint8(
    tokenizer: OptVQModel, token_ids: torch.Tensor, layout: TokenLayout, batch: int = 64
) -> np.ndarray:
    """Token ids (N, L) -> uint8 images (N, H, W, C) through the tokenizer's decoder."""
    postprocess = OptVQImageProcessor().postprocess  # [-1, 1] -> uint8, clipped
    device = next(tokenizer.parameters()).device
    chunks = []
    with torch.no_grad():
        for start in range(0, token_ids.shape[0], batch):
            ids = token_ids[start : start + batch].to(device)
            images = tokenizer.detokenize(
                ids, order=layout.order, vocabulary=layout.vocabulary, latent_shape=layout.latent_shape
            )
            chunks.append(postprocess(images, output_type="np"))
    return np.concatenate(chunks)


def reference_images(
    tokenizer: OptVQModel, tokens: datasets.Dataset, layout: TokenLayout, names: list[str] | None, per_row: int
) -> np.ndarray:
    """
    The stored tokens of real images decoded, laid out like the sample grid: the first `per_row` images of each class
    (blank where a class has fewer), or the first `per_row` images without classes.
    """
    if not names:
        return decode_to_uint8(tokenizer, tokens[: min(per_row, len(tokens))]["input_ids"], layout)
    labels = np.asarray(list(tokens.with_format(None)["label"]))
    picked = [np.flatnonzero(labels == label)[:per_row].tolist() for label in range(len(names))]
    flat = [index for row in picked for index in row]
    decoded = decode_to_uint8(tokenizer, tokens[flat]["input_ids"], layout)  # a label column has some class present
    grid, cursor = [], 0
    for row in picked:
        for slot in range(per_row):
            if slot < len(row):
                grid.append(decoded[cursor])
                cursor += 1
            else:  # a class with fewer images than a row holds
                grid.append(np.zeros_like(decoded[0]))
    return np.stack(grid)


# ---------------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------------
def evaluate_loss(model, loader, fmt: SequenceFormat, accelerator: Accelerator) -> float:
    """Mean next-token loss (nats per image token) over a loader, over all processes."""
    model.eval()
    total, count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    with torch.no_grad():
        for batch in loader:
            sequence, targets = fmt.sequences(batch["input_ids"], batch.get("label"))
            loss = model(input_ids=sequence, labels=targets).loss
            total += loss.detach().float() * sequence.shape[0]
            count += sequence.shape[0]
    model.train()
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return float(total / count) if count > 0 else float("nan")


def save_samples(
    args: ArOptions,
    generator: LlamaForCausalLM,
    tokenizer: OptVQModel,
    fmt: SequenceFormat,
    tokens: datasets.Dataset,
    names: list[str] | None,
    output_dir: Path,
) -> None:
    """Sample a grid (one row per class, or a square), decode it, and save it next to the reference grid."""
    torch.manual_seed(args.seed)
    if names:
        labels = torch.arange(len(names)).repeat_interleave(args.samples_per_class)
        columns, per_row = args.samples_per_class, args.samples_per_class
    else:
        labels = None
        columns, per_row = math.ceil(math.sqrt(args.num_samples)), args.num_samples
    count = labels.numel() if names else args.num_samples
    sampled = sample_tokens(generator, fmt, labels, count, args)
    images = decode_to_uint8(tokenizer, sampled, fmt.layout)
    image_grid(images, columns, scale=args.grid_scale).save(output_dir / "samples.png")
    save_file(
        {"token_ids": sampled.contiguous(), **({"labels": labels} if names else {})},
        output_dir / "samples.safetensors",
    )
    # The tokenizer's round trip of real images of the same classes: what a perfect generator could reach.
    reference = reference_images(tokenizer, tokens, fmt.layout, names, per_row)
    image_grid(reference, columns, scale=args.grid_scale).save(output_dir / "reference.png")


def transformer_config(args: ArOptions, fmt: SequenceFormat) -> LlamaConfig:
    """A small Llama over the image tokens, the begin-of-image token and the class tokens."""
    return LlamaConfig(
        vocab_size=fmt.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size or 4 * args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=args.num_attention_heads,
        max_position_embeddings=fmt.prefix_length + fmt.layout.sequence_length,
        bos_token_id=fmt.boi_id,
        eos_token_id=None,  # every sequence has the same length: generation stops at max_new_tokens
        pad_token_id=None,
        tie_word_embeddings=False,
    )


def train(
    args: ArOptions,
    accelerator: Accelerator,
    model: LlamaForCausalLM,
    fmt: SequenceFormat,
    train_loader: DataLoader,
    val_loader: DataLoader | None,
) -> tuple[torch.nn.Module, list[float], dict[int, float]]:
    """AdamW with warmup and cosine decay; returns the prepared model, the loss of every step and validation losses."""
    decay = [p for p in model.parameters() if p.ndim >= 2]  # no weight decay on norms
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.learning_rate,
        betas=(0.9, 0.95),
    )
    # accelerate steps a prepared scheduler once per process at each optimizer step: count steps the same way.
    scheduler = get_scheduler(
        "cosine",
        optimizer,
        num_warmup_steps=args.warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_loader, scheduler = accelerator.prepare(model, optimizer, train_loader, scheduler)
    if val_loader is not None:
        val_loader = accelerator.prepare(val_loader)

    losses: list[float] = []
    validation_losses: dict[int, float] = {}
    start = time.perf_counter()
    model.train()
    while len(losses) < args.max_train_steps:
        for batch in train_loader:
            with accelerator.accumulate(model):
                sequence, targets = fmt.sequences(batch["input_ids"], batch.get("label"), args.class_dropout)
                loss = model(input_ids=sequence, labels=targets).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            losses.append(float(accelerator.reduce(loss.detach().float(), "mean")))
            step = len(losses)
            if step % args.log_every == 0 or step == args.max_train_steps:
                recent = losses[-args.log_every :]
                accelerator.print(
                    f"step {step}/{args.max_train_steps}  loss {sum(recent) / len(recent):.4f}  "
                    f"lr {scheduler.get_last_lr()[0]:.2e}  {time.perf_counter() - start:.0f}s"
                )
            last = step == args.max_train_steps
            if val_loader is not None and (last or (args.eval_every and step % args.eval_every == 0)):
                validation_losses[step] = evaluate_loss(model, val_loader, fmt, accelerator)
                accelerator.print(f"step {step}  validation loss {validation_losses[step]:.4f}")
            if last:
                break
    return model, losses, validation_losses


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    accelerator = Accelerator(
        mixed_precision=args.mixed_precision, gradient_accumulation_steps=args.gradient_accumulation_steps
    )
    set_seed(args.seed)
    output_dir = Path(args.output_dir)
    cache_dir = Path(args.token_cache_dir) if args.token_cache_dir else output_dir / "tokens"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        cache_dir.mkdir(parents=True, exist_ok=True)
    if args.label_column is None and args.dataset_name is None and args.data_dir is None and not args.token_dataset:
        args.label_column = "label"  # the digits' classes
    if args.class_conditional and args.label_column is None and not args.token_dataset:
        accelerator.print("no --label_column: training without class tokens")
        args.class_conditional = False

    # 1. Tokenize once (the main process writes the cache, the others read it).
    tokenizer = OptVQModel.from_pretrained(args.tokenizer).eval().to(accelerator.device)
    tokenizer.requires_grad_(False)
    tokenize_start = time.perf_counter()
    if args.token_dataset is not None:
        tokens, layout, names = load_pretokenized(args, tokenizer)
        image_size = layout.latent_shape[0] * tokenizer.config.downsample_factor
    else:
        image_size = choose_image_size(args, tokenizer.config)
        side = image_size // tokenizer.config.downsample_factor
        layout = tokenizer.token_layout(args.order, args.vocabulary, (side, side))
        with accelerator.main_process_first():
            tokens, meta = pretokenize(args, tokenizer, image_size, cache_dir, accelerator.device)
        names = meta["class_names"]
    tokenize_seconds = time.perf_counter() - tokenize_start
    side = layout.latent_shape[0]
    fmt = SequenceFormat(layout, len(names) if names else 0)
    accelerator.print(
        f"{len(tokens)} images -> {layout.sequence_length} tokens each ({layout.num_heads} heads x {side}x{side}, "
        f"{args.order}, {args.vocabulary} vocabulary of {layout.vocab_size}); transformer vocabulary {fmt.vocab_size}"
    )

    columns = ["input_ids"] + (["label"] if names else [])
    tokens = tokens.with_format("torch", columns=columns)
    if args.validation_fraction > 0 and len(tokens) >= 20:
        split = tokens.train_test_split(test_size=args.validation_fraction, seed=args.seed)
        train_tokens, val_tokens = split["train"], split["test"]
    else:
        train_tokens, val_tokens = tokens, None
    drop_last = len(train_tokens) > args.batch_size  # equal batches, unless the data is smaller than one
    train_loader = DataLoader(train_tokens, batch_size=args.batch_size, shuffle=True, drop_last=drop_last)
    val_loader = DataLoader(val_tokens, batch_size=args.batch_size) if val_tokens is not None else None

    # 2. The transformer, 3. training.
    model = LlamaForCausalLM(transformer_config(args, fmt))
    num_parameters = sum(p.numel() for p in model.parameters())
    accelerator.print(f"LlamaForCausalLM: {num_parameters:,} parameters, {args.num_layers} x {args.hidden_size}")
    train_start = time.perf_counter()
    model, losses, validation_losses = train(args, accelerator, model, fmt, train_loader, val_loader)
    train_seconds = time.perf_counter() - train_start
    val_loss = validation_losses.get(len(losses))

    # 4. Sample, decode, save (main process).
    summary = {
        "images": len(tokens),
        "tokens_per_image": layout.sequence_length,
        "image_vocab_size": layout.vocab_size,
        "transformer_parameters": num_parameters,
        "steps": len(losses),
        "first_loss": losses[0] if losses else None,
        "final_train_loss": sum(losses[-50:]) / len(losses[-50:]) if losses else None,
        "validation_loss": val_loss,
        "validation_losses": validation_losses,
        "uniform_loss": math.log(layout.num_codes),
        "tokenize_seconds": round(tokenize_seconds, 2),
        "train_seconds": round(train_seconds, 2),
    }
    if accelerator.is_main_process:
        generator = accelerator.unwrap_model(model).eval()
        sample_start = time.perf_counter()
        save_samples(args, generator, tokenizer, fmt, tokens, names, output_dir)
        summary["sample_seconds"] = round(time.perf_counter() - sample_start, 2)
        generator.save_pretrained(output_dir / "generator")
        (output_dir / "generator" / "token_layout.json").write_text(
            json.dumps(
                {**fmt.to_json(), "tokenizer": str(args.tokenizer), "image_size": image_size, "class_names": names},
                indent=2,
            )
            + "\n"
        )
        summary["total_seconds"] = round(time.perf_counter() - start, 2)
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        accelerator.print(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


if __name__ == "__main__":
    main()
