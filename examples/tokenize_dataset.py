"""Pre-tokenize an image dataset with an OptVQ tokenizer into a `datasets` dataset (for training generators).

Launch lines:

    # one process (CPU or one GPU)
    accelerate launch examples/tokenize_dataset.py --tokenizer path/or/hub-id --train_data_dir images/ \
        --output_dir tokens/
    # N GPUs on one machine
    accelerate launch --multi_gpu --num_processes N examples/tokenize_dataset.py --tokenizer ... --dataset_name \
        imagenet-1k --label_column label --variants center flip --output_dir tokens/
    # M nodes of N GPUs (run on every node, with its --machine_rank; output_dir on a shared file system)
    accelerate launch --multi_gpu --num_machines M --num_processes $((M*N)) --machine_rank R \
        --main_process_ip HOST --main_process_port 29500 examples/tokenize_dataset.py ... --output_dir /shared/tokens
    # 2 CPU processes (gloo)
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 examples/tokenize_dataset.py ...

The result is `<output_dir>/dataset` (read it with `optvq_hf.training.token_data.load_token_dataset`); the shards
in `<output_dir>/shards` make a rerun resume where an interrupted one stopped. See that module for the format.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

from optvq_hf import OptVQModel
from optvq_hf.image_processing_optvq import OptVQImageProcessor
from optvq_hf.training import token_data
from optvq_hf.training.cli import option, options_to_dict, parse_options
from optvq_hf.training.data import _check_column, _undecoded


@dataclass
class TokenizeOptions:
    """Every option of a tokenization run."""

    tokenizer: str = option(None, "the OptVQ tokenizer: a Hub model id or a saved folder (required)")
    tokenizer_revision: str | None = option(None, "the Hub revision of the tokenizer")
    dataset_name: str | None = option(None, "a Hub dataset")
    dataset_config_name: str | None = option(None, "the configuration of dataset_name")
    train_data_dir: str | None = option(None, "a local folder of images (an imagefolder)")
    split: str = option("train", "the split to tokenize")
    image_column: str = option("image", "the column that holds the images")
    label_column: str | None = option(None, "an optional column of integer class labels, kept as `label`")
    streaming: bool = option(False, "stream the dataset instead of downloading it")
    max_samples: int | None = option(None, "tokenize only the first max_samples rows")
    variants: list[str] = option(["center"], "augmentation variants: center, flip, ten_crop (see token_data)")
    order: str = option("position-major", "token order: position-major or head-major")
    vocabulary: str = option("shared", "token vocabulary: shared or per-head")
    batch_size: int = option(64, "rows (images x variants) encoded per batch and process")
    shard_size: int = option(1000, "source rows per shard (fixed: the result does not depend on the processes)")
    dataloader_num_workers: int | None = option(
        None,
        "DataLoader processes decoding and resizing images (default: the cores per process less the ones the process "
        "keeps busy: one on GPU, 1 to 8 workers; its torch threads on CPU, 0 to 8 workers)",
    )
    mixed_precision: str = option("bf16", "bf16 autocast of the encoder on GPU (the quantizer stays float32), or no")
    skip_bad_images: bool = option(False, "skip unreadable images (counted) instead of failing on the first")
    output_dir: str = option("optvq-tokens", "where shards and the merged dataset go")
    push_to_hub: bool = option(False, "push the merged dataset to the Hub")
    hub_repo_id: str | None = option(None, "the dataset repo to push to")
    hub_dry_run: bool = option(False, "with push_to_hub: only print what would be uploaded")
    cache_dir: str | None = option(None, "the datasets cache")

    def __post_init__(self) -> None:
        if not self.tokenizer:
            raise ValueError("tokenizer is required: a Hub model id or a folder saved with save_pretrained")
        if (self.dataset_name is None) == (self.train_data_dir is None):
            raise ValueError("pass exactly one of dataset_name and train_data_dir")
        for name in ("batch_size", "shard_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_samples is not None and self.max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or null, got {self.max_samples}")
        if self.dataloader_num_workers is not None and self.dataloader_num_workers < 0:
            raise ValueError(f"dataloader_num_workers must be >= 0, got {self.dataloader_num_workers}")
        if self.mixed_precision not in ("bf16", "no"):
            raise ValueError(f"mixed_precision must be bf16 or no, got {self.mixed_precision!r}")
        if self.push_to_hub and not self.hub_repo_id:
            raise ValueError("push_to_hub needs hub_repo_id")
        token_data.expand_variants(self.variants)


def parse_args(argv=None) -> TokenizeOptions:
    return parse_options(TokenizeOptions, argv, description=__doc__.split("\n\n")[0])


def load_tokenizer(name: str, revision: str | None) -> tuple[OptVQModel, OptVQImageProcessor]:
    """The model and its image processor (the saved one if the folder / repo has one, else from the config)."""
    model = OptVQModel.from_pretrained(name, revision=revision)
    try:
        processor = OptVQImageProcessor.from_pretrained(name, revision=revision)
    except OSError:
        processor = OptVQImageProcessor.from_model_config(model.config)
    return model.eval(), processor


def load_source(options: TokenizeOptions):
    """(rows, number of rows or None for a stream, description, number of classes or None)."""
    import datasets

    if options.train_data_dir is not None:
        if not os.path.isdir(options.train_data_dir):
            raise ValueError(f"train_data_dir {options.train_data_dir!r} is not a directory")
        source, kwargs, description = "imagefolder", {"data_dir": options.train_data_dir}, options.train_data_dir
    else:
        source, kwargs, description = options.dataset_name, {"name": options.dataset_config_name}, options.dataset_name
    splits = datasets.load_dataset(source, cache_dir=options.cache_dir, streaming=options.streaming, **kwargs)
    if options.split not in splits:
        raise ValueError(f"split {options.split!r} is not a split of {description}: {sorted(splits)}")
    rows = splits[options.split]
    where = f"split {options.split!r} of {description}"
    _check_column(rows, options.image_column, where)
    num_classes = None
    if options.label_column is not None:
        _check_column(rows, options.label_column, where)
        feature = (rows.features or {}).get(options.label_column)
        num_classes = feature.num_classes if isinstance(feature, datasets.ClassLabel) else None
    rows = _undecoded(rows, options.image_column)
    if options.streaming:
        return (rows.take(options.max_samples) if options.max_samples else rows), None, where, num_classes
    count = len(rows) if options.max_samples is None else min(options.max_samples, len(rows))
    if count == 0:
        raise ValueError(f"{where} is empty")
    return rows, count, where, num_classes


def main(argv=None) -> token_data.TokenDataset:
    from accelerate import Accelerator

    options = parse_args(argv)
    accelerator = Accelerator()
    model, processor = load_tokenizer(options.tokenizer, options.tokenizer_revision)
    model.to(accelerator.device)
    layout = model.token_layout(options.order, options.vocabulary)
    variant_ids = token_data.expand_variants(options.variants)
    rows, num_rows, where, num_classes = load_source(options)
    on_gpu = accelerator.device.type == "cuda"
    settings = {
        key: getattr(options, key)
        for key in ("tokenizer", "tokenizer_revision", "variants", "order", "vocabulary", "shard_size", "max_samples")
        + ("image_column", "label_column", "dataset_name", "dataset_config_name", "train_data_dir", "split")
    }
    if accelerator.is_main_process:
        token_data.check_run_settings(options.output_dir, settings, write=True)
    accelerator.wait_for_everyone()
    token_data.check_run_settings(options.output_dir, settings, write=False)
    stats = token_data.write_shards(
        model,
        layout,
        processor,
        rows,
        num_rows,
        options.output_dir,
        image_column=options.image_column,
        label_column=options.label_column,
        variant_ids=variant_ids,
        shard_size=options.shard_size,
        batch_size=options.batch_size,
        num_workers=(
            token_data.default_num_workers(
                int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)), accelerator.device
            )
            if options.dataloader_num_workers is None
            else options.dataloader_num_workers
        ),
        rank=accelerator.process_index,
        num_processes=accelerator.num_processes,
        device=accelerator.device,
        autocast_dtype=torch.bfloat16 if on_gpu and options.mixed_precision == "bf16" else None,
        skip_bad_images=options.skip_bad_images,
        name=where,
        progress=accelerator.is_local_main_process,
    )
    rate = stats.images / max(stats.seconds, 1e-9)
    print(
        f"[rank {accelerator.process_index}] {stats.images} images -> {stats.rows} rows in {stats.seconds:.1f} s "
        f"({rate:.1f} images/s, encoding {stats.encode_seconds:.1f} s); shards written {stats.shards_written}, "
        f"already done {stats.shards_skipped}; skipped {stats.skipped} unreadable images {stats.skipped_rows[:20]}"
    )
    accelerator.wait_for_everyone()
    tokenizer_revision = options.tokenizer_revision or getattr(model.config, "_commit_hash", None)
    metadata = token_data.layout_metadata(
        layout, processor, variant_ids, options.tokenizer, tokenizer_revision, num_classes, where
    )
    metadata["options"] = json.loads(json.dumps(options_to_dict(options), default=str))
    if accelerator.is_main_process:
        num_shards = None if num_rows is None else -(-num_rows // options.shard_size)
        merged = token_data.merge_shards(options.output_dir, metadata, num_shards)
        print(f"wrote {len(merged)} rows to {os.path.join(options.output_dir, token_data.DATASET_DIR)}")
        if options.push_to_hub:
            print(token_data.push_token_dataset(options.output_dir, options.hub_repo_id, options.hub_dry_run))
    accelerator.wait_for_everyone()
    return token_data.load_token_dataset(options.output_dir)


if __name__ == "__main__":
    main()
