"""Pre-tokenized image datasets: write OptVQ tokens of a whole image dataset as a `datasets` dataset, read them back.

Layout of a token dataset (`save_to_disk` format, so `datasets.load_from_disk` opens it too):

- columns `tokens` (fixed-length sequence of the smallest unsigned integer type that holds the vocabulary: uint8 up
  to 256 ids, uint16 up to 65536, else int32), `label` (only when a label column was given), `index` (the row of the
  source split), `variant` (the id of the augmentation variant, see `VARIANTS`);
- rows sorted by (index, variant);
- the metadata (`TOKEN_METADATA_KEY`): token order, vocabulary, heads, codes, latent shape, tokenizer id and revision,
  image processor settings, the variants and their names, the number of classes. It is stored twice, because
  `push_to_hub` drops `DatasetInfo.description`: as JSON in `dataset.info.description` (survives `save_to_disk` and
  `load_from_disk`) and as the file `optvq_tokens.json` next to the data (in the dataset folder, or at the root of the
  Hub dataset repo). `load_token_dataset` reads either.

Variants (each a row of its own, `variant` = position in `VARIANTS`):

- `center`: exactly the tokenizer's image processor (resize the shorter side to `resolution`, center crop);
- `flip`: `center`, flipped left-right;
- `ten_crop`: LlamaGen's `extract_codes --ten-crop`: the processor at `round(resolution * 1.1)` (resize the shorter
  side, center crop to that square), then the five `resolution` crops of `torchvision.transforms.TenCrop` (top-left,
  top-right, bottom-left, bottom-right, center) and their left-right flips: ten rows, ids 2..11.

Shards: source rows are cut into fixed shards of `shard_size` rows; shard s goes to process `s % num_processes`,
which writes it to `<output_dir>/shards/shard-SSSSS` (written to a temporary folder, renamed when complete). A rerun
skips the shards already present, so an interrupted run resumes without redoing them; the merged dataset is the
concatenation of the shards in order and so does not depend on the number of processes.

Reading: each shard is cut into batches of `batch_size // len(variants)` source rows (a batch never crosses a
shard). A DataLoader item is one whole batch: its worker reads the rows (one Arrow slice), decodes them and runs the
image processor once for the batch (`OptVQImageProcessor.pixel_array`, the same steps as `preprocess`), and returns
one (rows x variants, C, R, R) array, so that one transfer between processes serves a batch. A dataset is read by
one DataLoader (one set of worker processes) for all of this process's unfinished shards; a stream, by one per
shard, since its rows come from the stream in this process. The main process encodes the batches in order and
writes a shard (an Arrow table built from numpy arrays) after its last batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..image_processing_optvq import OptVQImageProcessor
from ..tokens import TokenLayout
from .data import to_pil

TOKEN_METADATA_KEY = "optvq_tokens"
METADATA_FILE = "optvq_tokens.json"
SHARDS_DIR = "shards"
DATASET_DIR = "dataset"
TEN_CROP_RANGE = 1.1  # LlamaGen's --crop-range: the ten crops are taken from a square 1.1 times the resolution
TEN_CROP_NAMES = ("tl", "tr", "bl", "br", "center")
VARIANTS = (
    ("center", "flip")
    + tuple(f"ten_crop_{n}" for n in TEN_CROP_NAMES)
    + tuple(f"ten_crop_{n}_flip" for n in TEN_CROP_NAMES)
)
VARIANT_GROUPS = {"center": ("center",), "flip": ("flip",), "ten_crop": VARIANTS[2:]}


def token_dtype(vocab_size: int) -> str:
    """The smallest `datasets` integer type holding ids in [0, vocab_size)."""
    if vocab_size <= 2**8:
        return "uint8"
    if vocab_size <= 2**16:
        return "uint16"
    if vocab_size <= 2**31:
        return "int32"
    return "int64"


def default_num_workers(processes_on_this_machine: int = 1, device: torch.device | str = "cpu") -> int:
    """DataLoader workers per process: this machine's usable cores shared among its processes, less the cores the
    process itself keeps busy: on GPU one (it feeds the device and writes the shards), at least one worker and at
    most 8; on CPU its torch threads (`torch.get_num_threads()`: the encoder runs on these cores), from 0 to 8. On
    CPU a worker beyond the free cores preempts the encoder's threads, which then wait for each other at every
    parallel operator, and costs more than decoding in the process itself (0 workers)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    per_process = cores // max(1, processes_on_this_machine)
    if torch.device(device).type == "cpu":
        return max(0, min(8, per_process - torch.get_num_threads()))
    return max(1, min(8, per_process - 1))


def expand_variants(groups: Sequence[str]) -> list[int]:
    """Variant ids of the chosen groups (`center`, `flip`, `ten_crop`), in id order."""
    unknown = [g for g in groups if g not in VARIANT_GROUPS]
    if unknown or not groups:
        raise ValueError(f"variants must be a non-empty list of {sorted(VARIANT_GROUPS)}, got {list(groups)}")
    return sorted({VARIANTS.index(name) for g in groups for name in VARIANT_GROUPS[g]})


def batch_variant_images(
    processor: OptVQImageProcessor, images: Sequence[PIL.Image.Image], variant_ids: Sequence[int]
) -> np.ndarray:
    """(B, V, C, R, R) float32 pixel values in [-1, 1] of the chosen variants of each image (see the module
    docstring); the processor runs once per batch and size (`OptVQImageProcessor.pixel_array`)."""
    resolution = processor.resolution
    names = [VARIANTS[vid] for vid in variant_ids]
    center = processor.pixel_array(images) if {"center", "flip"} & set(names) else None
    ten = None
    if any(name.startswith("ten_crop_") for name in names):
        ten = processor.pixel_array(images, resolution=round(resolution * TEN_CROP_RANGE))
    out = []
    for name in names:
        if name in ("center", "flip"):
            out.append(center if name == "center" else center[..., ::-1])
            continue
        size = ten.shape[-1]
        corner = name.removeprefix("ten_crop_").removesuffix("_flip")
        # torchvision's FiveCrop: corners flush with the edges, the center crop at int(round((size - R) / 2)).
        mid = int(round((size - resolution) / 2.0))
        top, left = {
            "tl": (0, 0),
            "tr": (0, size - resolution),
            "bl": (size - resolution, 0),
            "br": (size - resolution, size - resolution),
            "center": (mid, mid),
        }[corner]
        crop = ten[..., top : top + resolution, left : left + resolution]
        out.append(crop[..., ::-1] if name.endswith("_flip") else crop)
    return np.ascontiguousarray(np.stack(out, axis=1), dtype=np.float32)


def variant_images(processor: OptVQImageProcessor, image: PIL.Image.Image, variant_ids: Sequence[int]) -> np.ndarray:
    """(V, C, R, R) float32 pixel values in [-1, 1] of the chosen variants of one image (see the module docstring)."""
    return batch_variant_images(processor, [image], variant_ids)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Metadata and reading
# ---------------------------------------------------------------------------------------------------------------------
def layout_metadata(
    layout: TokenLayout,
    processor: OptVQImageProcessor,
    variant_ids: Sequence[int],
    tokenizer: str,
    revision: str | None,
    num_classes: int | None,
    source: str,
) -> dict[str, Any]:
    """The metadata dict stored with a token dataset."""
    return {
        "format_version": 1,
        "layout": layout.to_dict(),
        "vocab_size": layout.vocab_size,
        "sequence_length": layout.sequence_length,
        "token_dtype": token_dtype(layout.vocab_size),
        "tokenizer": tokenizer,
        "tokenizer_revision": revision,
        "image_processor": {
            k: getattr(processor, k) for k in ("resolution", "do_resize", "do_center_crop", "resample", "num_channels")
        },
        "variants": {str(v): VARIANTS[v] for v in variant_ids},
        "ten_crop": {"outer_size": round(processor.resolution * TEN_CROP_RANGE), "crop_size": processor.resolution},
        "num_classes": num_classes,
        "source": source,
    }


@dataclass
class TokenDataset:
    """A token dataset as read by `load_token_dataset`.

    Attributes:
        dataset (`datasets.Dataset`): columns `tokens`, `label` (if any), `index`, `variant`.
        layout (`TokenLayout`): how the tokens map back to code indices (`layout.to_indices`).
        metadata (`dict`): everything stored with the dataset (see `layout_metadata`).
        num_classes (`int` or `None`): classes of `label`, `None` without labels.
    """

    dataset: Any
    layout: TokenLayout
    metadata: dict = field(default_factory=dict)
    num_classes: int | None = None

    def torch_tokens(self, rows: Any = slice(None)) -> torch.LongTensor:
        """(N, L) int64 tokens of the selected rows."""
        return torch.as_tensor(np.asarray(self.dataset.with_format("numpy")[rows]["tokens"]), dtype=torch.long)


def metadata_from_dataset(dataset: Any) -> dict | None:
    try:
        payload = json.loads(dataset.info.description or "")
    except (TypeError, ValueError):
        return None
    return payload.get(TOKEN_METADATA_KEY) if isinstance(payload, dict) else None


def load_token_dataset(path_or_repo_id: str, split: str | None = None) -> TokenDataset:
    """A token dataset from a folder written by `tokenize_dataset.py` (its output folder or the `dataset` folder
    inside) or a Hub dataset repo pushed by it. `split` selects a split of a Hub repo (default `train`)."""
    import datasets

    path = os.fspath(path_or_repo_id)
    metadata = None
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, DATASET_DIR)) and not os.path.exists(os.path.join(path, "state.json")):
            path = os.path.join(path, DATASET_DIR)
        loaded = datasets.load_from_disk(path)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[split or "train"]
        sidecar = os.path.join(path, METADATA_FILE)
        metadata = metadata_from_dataset(loaded)
        if metadata is None and os.path.exists(sidecar):
            with open(sidecar) as handle:
                metadata = json.load(handle)
    else:
        loaded = datasets.load_dataset(path, split=split or "train")
        metadata = metadata_from_dataset(loaded)
        if metadata is None:
            from huggingface_hub import hf_hub_download

            with open(hf_hub_download(path, METADATA_FILE, repo_type="dataset")) as handle:
                metadata = json.load(handle)
    if metadata is None:
        raise ValueError(
            f"{path_or_repo_id!r} holds no {TOKEN_METADATA_KEY!r} metadata (neither in its info description nor in "
            f"{METADATA_FILE}): write it with examples/tokenize_dataset.py"
        )
    missing = [c for c in ("tokens", "index", "variant") if c not in loaded.column_names]
    if missing:
        raise ValueError(f"{path_or_repo_id!r} lacks the token dataset column(s) {missing}")
    return TokenDataset(loaded, TokenLayout.from_dict(metadata["layout"]), metadata, metadata.get("num_classes"))


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class RowBatch:
    """What a DataLoader worker returns for one batch of source rows: the decoded and preprocessed good rows, as
    one array (one transfer between processes per batch, not one per image)."""

    shard: int
    last: bool  # the last batch of its shard
    index: np.ndarray  # (n,) int64 source rows of the good images
    label: np.ndarray | None  # (n,) int64
    pixels: torch.Tensor  # (n * V, C, R, R) float32, rows in (index, variant) order
    skipped: list[int]  # source rows of unreadable images (only with skip_bad_images)

    def pin_memory(self) -> RowBatch:  # called by a DataLoader with pin_memory=True, for asynchronous copies
        return replace(self, pixels=self.pixels.pin_memory())


class RowBatches(torch.utils.data.Dataset):
    """Item k: batch k of `batches`, each `(shard, last, indices, rows)` with `rows` the source rows themselves (a
    stream) or `None` (read the contiguous `indices` from the source), decoded and turned into variants."""

    def __init__(self, source, batches, image_column, label_column, processor, variant_ids, skip_bad_images, name):
        self.source, self.batches = source, batches
        self.image_column, self.label_column = image_column, label_column
        self.processor, self.variant_ids = processor, variant_ids
        self.skip_bad_images, self.name = skip_bad_images, name

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> RowBatch:
        shard, last, indices, rows = self.batches[k]
        if rows is None:
            rows = self.source[indices.start : indices.stop]  # one Arrow read per batch: {column: values}
        else:
            columns = [self.image_column] + ([] if self.label_column is None else [self.label_column])
            rows = {column: [row[column] for row in rows] for column in columns}
        labels = rows[self.label_column] if self.label_column is not None else [None] * len(indices)
        decoded, skipped = [], []
        for index, value, label in zip(indices, rows[self.image_column], labels):
            try:
                decoded.append((index, label, to_pil(value, f"row {index} of {self.name}")))
            except ValueError:
                if not self.skip_bad_images:
                    raise
                skipped.append(index)
        decoded, pixels = self.preprocess(decoded, skipped)
        return RowBatch(
            shard,
            last,
            np.asarray([index for index, _, _ in decoded], dtype=np.int64),
            None if self.label_column is None else np.asarray([int(label) for _, label, _ in decoded], dtype=np.int64),
            torch.from_numpy(pixels.reshape(-1, *pixels.shape[2:])),
            skipped,
        )

    def preprocess(self, decoded: list, skipped: list[int]) -> tuple[list, np.ndarray]:
        """The decoded `(index, label, image)` items that the processor accepts and their (n, V, C, R, R) pixels,
        the whole batch at once; if the processor rejects an image, the items are redone one by one so that the
        error names the row (or the row is skipped and added to `skipped`)."""
        if decoded:
            try:
                return decoded, batch_variant_images(
                    self.processor, [image for _, _, image in decoded], self.variant_ids
                )
            except ValueError:
                pass
        kept, pixels = [], []
        for item in decoded:
            try:
                pixels.append(variant_images(self.processor, item[2], self.variant_ids))
                kept.append(item)
            except ValueError as error:
                if not self.skip_bad_images:
                    raise ValueError(f"image at row {item[0]} of {self.name}: {error}") from error
                skipped.append(item[0])
        if pixels:
            return kept, np.stack(pixels)
        resolution, channels = self.processor.resolution, self.processor.num_channels
        return kept, np.zeros((0, len(self.variant_ids), channels, resolution, resolution), dtype=np.float32)


def check_run_settings(output_dir: str, settings: dict, write: bool) -> None:
    """Refuse to resume into shards written with other settings (another tokenizer, variants, layout, shard size or
    source would mix incompatible rows); `write` (one process) records the settings of a fresh run."""
    path = os.path.join(output_dir, SHARDS_DIR, "settings.json")
    settings = json.loads(json.dumps(settings, default=str))
    if os.path.exists(path):
        with open(path) as handle:
            previous = json.load(handle)
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        if changed:
            details = ", ".join(f"{k}: {previous.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise ValueError(
                f"{output_dir!r} holds shards of a run with other settings ({details}): use another output_dir or "
                "delete its shards folder"
            )
    elif write:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as handle:
            json.dump(settings, handle, indent=2)


def shard_path(output_dir: str, shard: int) -> str:
    return os.path.join(output_dir, SHARDS_DIR, f"shard-{shard:05d}")


@dataclass
class WriteStats:
    images: int = 0
    rows: int = 0
    skipped: int = 0
    shards_written: int = 0
    shards_skipped: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    skipped_rows: list = field(default_factory=list)


def write_shards(
    model: torch.nn.Module,
    layout: TokenLayout,
    processor: OptVQImageProcessor,
    source: Any,
    num_rows: int | None,
    output_dir: str,
    *,
    image_column: str,
    label_column: str | None = None,
    variant_ids: Sequence[int] = (0,),
    shard_size: int = 1000,
    batch_size: int = 64,
    num_workers: int = 2,
    rank: int = 0,
    num_processes: int = 1,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    skip_bad_images: bool = False,
    name: str = "the dataset",
    progress: bool = True,
) -> WriteStats:
    """Tokenize this process's shards of `source` (a `datasets.Dataset` with `num_rows` rows, or an iterable of
    rows when streaming with `num_rows=None`) into `<output_dir>/shards`, skipping the shards already written."""
    import datasets
    from tqdm.auto import tqdm

    dtype = token_dtype(layout.vocab_size)
    features = {"tokens": datasets.Sequence(datasets.Value(dtype), length=layout.sequence_length)}
    if label_column is not None:
        features["label"] = datasets.Value("int64")
    features.update(index=datasets.Value("int64"), variant=datasets.Value("int16"))
    features = datasets.Features(features)
    stats = WriteStats()
    start_time = time.perf_counter()
    bar = tqdm(total=num_rows, unit="img", desc=f"tokenize [rank {rank}]", disable=not progress, position=rank)
    model.eval()
    device = torch.device(device)
    images_per_batch = max(1, batch_size // len(variant_ids))

    def batches(shard: int, indices: Sequence[int], rows: list | None) -> list[tuple]:
        """The shard's rows cut into batches: `(shard, last, indices, rows or None)`."""
        step = images_per_batch
        return [
            (
                shard,
                first + step >= len(indices),
                indices[first : first + step],
                None if rows is None else rows[first : first + step],
            )
            for first in range(0, len(indices), step)
        ]

    def work() -> Iterator[list[tuple]]:
        """Lists of batches, each list read by one DataLoader: every unfinished shard of this process at once for a
        dataset (one set of worker processes), shard by shard for a stream (its rows are held in memory)."""
        if num_rows is not None:
            todo = []
            for shard in range(rank, math.ceil(num_rows / shard_size), num_processes):
                indices = range(shard * shard_size, min(num_rows, (shard + 1) * shard_size))
                if os.path.isdir(shard_path(output_dir, shard)):
                    stats.shards_skipped += 1
                    bar.update(len(indices))
                else:
                    todo += batches(shard, indices, None)
            yield todo
            return
        # A stream: rows are read in order (undecoded); this process keeps the rows of its unfinished shards.
        current, indices, rows = None, [], []
        for index, row in enumerate(source):
            shard = index // shard_size
            if shard % num_processes != rank or os.path.isdir(shard_path(output_dir, shard)):
                continue
            if current is not None and shard != current:
                yield batches(current, indices, rows)
                indices, rows = [], []
            current = shard
            indices.append(index)
            rows.append(row)
        if rows:
            yield batches(current, indices, rows)

    parts: list[dict[str, np.ndarray]] = []  # the encoded batches of the shard being written
    for todo in work():
        if not todo:
            continue
        loader = torch.utils.data.DataLoader(
            RowBatches(source, todo, image_column, label_column, processor, variant_ids, skip_bad_images, name),
            batch_size=None,  # items are whole batches
            num_workers=num_workers,
            pin_memory=device.type == "cuda",
        )
        for batch in loader:
            stats.skipped += len(batch.skipped)
            stats.skipped_rows += batch.skipped
            if len(batch.index):
                encode_start = time.perf_counter()
                with (
                    torch.no_grad(),
                    torch.autocast(
                        device_type=device.type,
                        dtype=autocast_dtype or torch.bfloat16,
                        enabled=autocast_dtype is not None,
                    ),
                ):
                    codes = model.encode(batch.pixels.to(device, non_blocking=True)).indices
                tokens = layout.to_tokens(codes).cpu().numpy().astype(dtype)
                stats.encode_seconds += time.perf_counter() - encode_start
                part = {"tokens": tokens}
                if label_column is not None:
                    part["label"] = np.repeat(batch.label, len(variant_ids))
                part["index"] = np.repeat(batch.index, len(variant_ids))
                part["variant"] = np.tile(np.asarray(variant_ids, dtype=np.int16), len(batch.index))
                parts.append(part)
            done = len(batch.index) + len(batch.skipped)
            stats.images += done
            bar.update(done)
            if batch.last:
                stats.rows += write_shard(shard_path(output_dir, batch.shard), parts, features, rank)
                stats.shards_written += 1
                parts = []
    bar.close()
    stats.seconds = time.perf_counter() - start_time
    return stats


def write_shard(final: str, parts: list[dict[str, np.ndarray]], features: Any, rank: int) -> int:
    """Write the encoded batches of one shard as a dataset folder (complete or absent); returns its rows."""
    import datasets
    import pyarrow as pa

    columns = {}
    for key, feature in features.items():
        values = [part[key] for part in parts]
        if key == "tokens":
            length = feature.length
            flat = np.concatenate([v.reshape(-1) for v in values]) if values else np.zeros(0, feature.feature.dtype)
            columns[key] = pa.FixedSizeListArray.from_arrays(pa.array(flat), length)
        else:
            columns[key] = pa.array(np.concatenate(values) if values else np.zeros(0, feature.dtype))
    table = pa.Table.from_arrays(list(columns.values()), schema=features.arrow_schema)
    temporary = f"{final}.tmp-{rank}"
    shutil.rmtree(temporary, ignore_errors=True)  # left by a killed run
    # One file even for 0 rows (every image of the shard skipped): without any, load_from_disk fails.
    datasets.Dataset(table, info=datasets.DatasetInfo(features=features)).save_to_disk(temporary, num_shards=1)
    os.replace(temporary, final)  # a shard exists only once complete
    return table.num_rows


def merge_shards(output_dir: str, metadata: dict, num_shards: int | None = None) -> Any:
    """Concatenate the shards in order into `<output_dir>/dataset` with the metadata; returns the dataset."""
    import datasets

    root = os.path.join(output_dir, SHARDS_DIR)
    names = sorted(n for n in os.listdir(root) if n.startswith("shard-") and ".tmp" not in n)
    if num_shards is not None and len(names) != num_shards:
        raise ValueError(f"expected {num_shards} shards in {root}, found {len(names)}: rerun to finish the others")
    merged = datasets.concatenate_datasets([datasets.load_from_disk(os.path.join(root, n)) for n in names])
    merged.info.description = json.dumps({TOKEN_METADATA_KEY: metadata})
    target = os.path.join(output_dir, DATASET_DIR)
    temporary = f"{target}.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
    merged.save_to_disk(temporary)
    with open(os.path.join(temporary, METADATA_FILE), "w") as handle:
        json.dump(metadata, handle, indent=2)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(temporary, target)
    return datasets.load_from_disk(target)


def push_token_dataset(output_dir: str, repo_id: str, dry_run: bool = False, private: bool | None = None) -> str:
    """Push `<output_dir>/dataset` and its `optvq_tokens.json` to a Hub dataset repo; a dry run only describes it."""
    import datasets

    target = os.path.join(output_dir, DATASET_DIR)
    dataset = datasets.load_from_disk(target)
    plan = f"{len(dataset)} rows ({dataset.data.nbytes / 1e6:.1f} MB) and {METADATA_FILE} -> dataset repo {repo_id}"
    if dry_run:
        return f"dry run: would push {plan}"
    from huggingface_hub import HfApi

    dataset.push_to_hub(repo_id, private=private)
    HfApi().upload_file(
        path_or_fileobj=os.path.join(target, METADATA_FILE),
        path_in_repo=METADATA_FILE,
        repo_id=repo_id,
        repo_type="dataset",
    )
    return f"pushed {plan}"


__all__ = [
    "METADATA_FILE",
    "TOKEN_METADATA_KEY",
    "VARIANTS",
    "TokenDataset",
    "default_num_workers",
    "expand_variants",
    "layout_metadata",
    "load_token_dataset",
    "merge_shards",
    "push_token_dataset",
    "token_dtype",
    "variant_images",
    "write_shards",
]
