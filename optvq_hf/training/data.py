"""Image datasets for training a tokenizer: loading, checks, augmentation and a resumable order of batches.

Sources (`load_image_splits`):

- a `datasets` dataset on the Hub (`dataset_name`, its `image_column`), optionally streamed (`streaming=True`);
- a local folder of images (`train_data_dir`, loaded as a `datasets` imagefolder);
- built-in offline sets: `"builtin:skimage-photos"` (the sample photographs scikit-image ships, whole photos held out
  for validation) and `"builtin:digits"` (scikit-learn's 8x8 handwritten digits). Both need the `demo` extra.

Transforms produce `pixel_values` in [-1, 1], channels first:

- training (`RandomCropTransform`): a square crop whose area is a random fraction of the shorter-side square, resized
  to the resolution, randomly flipped. `scale=(1, 1)` is the original OptVQ's "resize the shorter side, random
  crop, flip" augmentation.
- validation: `OptVQImageProcessor` (resize the shorter side, center crop), exactly what inference uses.

Reproducibility: the augmentation of a sample is a pure function of `(seed, epoch, index)` and the order of samples a
pure function of `(seed, epoch)` (`GlobalBatchSampler`), so that a run resumed from a checkpoint sees exactly the
batches of the uninterrupted run, with or without DataLoader workers, and the global batch of a step is the same set
of images whatever the number of processes it is split over.
"""

from __future__ import annotations

import io
import itertools
import math
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..image_modes import to_pil_image
from ..image_processing_optvq import OptVQImageProcessor

BUILTIN_PREFIX = "builtin:"
SKIMAGE_PHOTOS = "builtin:skimage-photos"
DIGITS = "builtin:digits"
BUILTIN_DATASETS = (SKIMAGE_PHOTOS, DIGITS)

# scikit-image sample photographs that ship inside its wheel (no pooch download), as of scikit-image 0.21 - 0.26:
# 7 colour photos and 5 grayscale textures. `cat` is `chelsea` again; synthetic images and documents are left out.
SKIMAGE_TRAIN_PHOTOS = (
    "astronaut",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "stereo_motorcycle",
    "coins",
    "moon",
    "grass",
    "gravel",
    "brick",
)
# Whole photographs held out for validation: one colour, one grayscale.
SKIMAGE_VALIDATION_PHOTOS = ("coffee", "camera")
# The photos are rescaled so that their shorter side has this many pixels, so that a crop fraction means the same
# amount of detail in every photo.
SKIMAGE_SHORTER_SIDE = 384
DIGITS_VALIDATION_COUNT = 297  # the last 297 of the 1797 digits (1500 for training)

_RESAMPLE = PIL.Image.Resampling.BICUBIC


# ---------------------------------------------------------------------------------------------------------------------
# Reading images
# ---------------------------------------------------------------------------------------------------------------------
def to_pil(value: Any, where: str) -> PIL.Image.Image:
    """A decoded PIL image from what a dataset row holds: a PIL image, `{"bytes", "path"}` (an undecoded `datasets`
    Image), a path, or an array. Raises a `ValueError` naming `where` for anything unreadable."""
    try:
        if isinstance(value, PIL.Image.Image):
            image = value
        elif isinstance(value, dict) and ("bytes" in value or "path" in value):
            where = f"{where} ({value['path']})" if value.get("path") else where
            if value.get("bytes") is not None:
                image = PIL.Image.open(io.BytesIO(value["bytes"]))
            elif value.get("path"):
                image = PIL.Image.open(value["path"])
            else:
                raise ValueError("the row holds neither bytes nor a path")
        elif isinstance(value, (str, os.PathLike)):
            where = f"{where} ({value})"
            image = PIL.Image.open(value)
        elif isinstance(value, (np.ndarray, torch.Tensor)):
            array = np.asarray(value)
            if array.dtype != np.uint8:
                array = np.clip(np.round(array.astype(np.float64) * (255.0 if array.max() <= 1.0 else 1.0)), 0, 255)
                array = array.astype(np.uint8)
            image = PIL.Image.fromarray(array)
        else:
            raise ValueError(f"cannot read an image from a value of type {type(value).__name__}")
        image.load()  # decode now: a truncated file must fail here, not later inside a transform
    except Exception as error:
        raise ValueError(f"unreadable image at {where}: {type(error).__name__}: {error}") from error
    return image


def convert_channels(image: PIL.Image.Image, num_channels: int) -> PIL.Image.Image:
    """RGB for 3 channels, grayscale for 1, by `optvq_hf.image_modes` (16-bit and float images scaled by their real
    range, transparency composited on white), rounded to 8 bits for PIL's resampling."""
    return to_pil_image(image, num_channels)


class ImageList:
    """The images of one split as a sequence of PIL images (a `datasets.Dataset` column or a list in memory)."""

    def __init__(self, images: Any, image_column: str | None = None, name: str = "dataset"):
        self.images = images
        self.image_column = image_column
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> PIL.Image.Image:
        if self.image_column is None:
            return self.images[index]
        return to_pil(self.images[index][self.image_column], f"row {index} of {self.name}")


# ---------------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------------
def pil_to_pixel_values(image: PIL.Image.Image) -> np.ndarray:
    """uint8 PIL image -> float32 (C, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[..., None]
    return array.transpose(2, 0, 1) / 127.5 - 1.0


@dataclass(frozen=True)
class RandomCropTransform:
    """Training augmentation: a random square crop, resized to `resolution`, randomly flipped left-right.

    The crop's area is a uniform fraction in `scale` of the area of the image's shorter-side square (so its side is
    `sqrt(fraction) * shorter side`), at a uniform position. `scale=(1, 1)` takes the full shorter side: resize the
    shorter side to `resolution` and crop at random, the original OptVQ's augmentation; `(0.2, 1)` is close to its
    ImageNet random-resized crop (square here, without its colour jitter and blur).
    """

    resolution: int
    scale: tuple[float, float] = (1.0, 1.0)
    flip: bool = True
    num_channels: int = 3

    def __post_init__(self) -> None:
        low, high = self.scale
        if not 0.0 < low <= high <= 1.0:
            raise ValueError(f"train_crop_scale must satisfy 0 < low <= high <= 1, got {tuple(self.scale)}")

    def __call__(self, image: PIL.Image.Image, rng: np.random.Generator) -> np.ndarray:
        image = convert_channels(image, self.num_channels)
        width, height = image.size
        fraction = rng.uniform(*self.scale)
        side = min(width, height) * math.sqrt(fraction)
        left = rng.uniform(0.0, width - side)
        top = rng.uniform(0.0, height - side)
        # One resampling step from the crop box to the output (PIL antialiases when it shrinks).
        crop = image.resize((self.resolution, self.resolution), _RESAMPLE, box=(left, top, left + side, top + side))
        if self.flip and rng.random() < 0.5:
            crop = crop.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        return pil_to_pixel_values(crop)


class TrainImages(torch.utils.data.Dataset):
    """Augmented training samples. Indexed by `(epoch, index)` pairs (from `GlobalBatchSampler`): the augmentation
    of a sample depends only on `(seed, epoch, index)`, not on worker processes or the random state."""

    def __init__(self, images: ImageList, transform: RandomCropTransform, seed: int, repeats: int = 1):
        if repeats < 1:
            raise ValueError(f"dataset_repeats must be >= 1, got {repeats}")
        self.images, self.transform, self.seed, self.repeats = images, transform, seed, repeats

    def __len__(self) -> int:
        return len(self.images) * self.repeats

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        return torch.from_numpy(self.transform(self.images[index % len(self.images)], rng))


class ValidationImages(torch.utils.data.Dataset):
    """Validation samples: resized and center-cropped by the model's image processor (no randomness)."""

    def __init__(self, images: ImageList, processor: OptVQImageProcessor):
        self.images, self.processor = images, processor

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.processor(self.images[index], return_tensors="pt")["pixel_values"][0]


# ---------------------------------------------------------------------------------------------------------------------
# Order of batches
# ---------------------------------------------------------------------------------------------------------------------
class GlobalBatchSampler(torch.utils.data.Sampler):
    """Batches of one process for one epoch, resumable at any batch.

    Every epoch is a permutation of the samples drawn from `(seed, epoch)`; global batch `m` of the epoch is the slice
    `[m * G, (m + 1) * G)` of it, with `G = batch_size * num_processes`, and process `r` takes the r-th contiguous
    `batch_size` of that slice. So a step trains on the same images whatever the number of processes, and a run
    resumed at batch `start` of an epoch continues with the batches the interrupted run would have drawn. The
    incomplete last global batch of an epoch is dropped.

    Yields lists of `(epoch, index)` keys for `TrainImages`.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        num_processes: int,
        rank: int,
        seed: int,
        epoch: int,
        start: int = 0,
        shuffle: bool = True,
    ):
        self.num_samples, self.batch_size, self.num_processes, self.rank = num_samples, batch_size, num_processes, rank
        self.seed, self.epoch, self.start, self.shuffle = seed, epoch, start, shuffle

    @staticmethod
    def batches_per_epoch(num_samples: int, batch_size: int, num_processes: int) -> int:
        return num_samples // (batch_size * num_processes)

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch(self.num_samples, self.batch_size, self.num_processes) - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = list(range(self.num_samples))
        global_batch = self.batch_size * self.num_processes
        total = self.batches_per_epoch(self.num_samples, self.batch_size, self.num_processes)
        for batch in range(self.start, total):
            offset = batch * global_batch + self.rank * self.batch_size
            yield [(self.epoch, index) for index in order[offset : offset + self.batch_size]]


class TrainBatches:
    """The endless sequence of this process's training batches, `(B, C, R, R)` tensors, with a resumable position.

    Epoch after epoch of `GlobalBatchSampler` batches loaded by a `DataLoader` (`num_workers` processes).
    `state_dict()` is the position of the next batch; `load_state_dict` continues from there.
    """

    def __init__(
        self,
        dataset: TrainImages,
        batch_size: int,
        num_processes: int,
        rank: int,
        seed: int,
        num_workers: int = 0,
        pin_memory: bool = False,
    ):
        per_epoch = GlobalBatchSampler.batches_per_epoch(len(dataset), batch_size, num_processes)
        if per_epoch == 0:
            raise ValueError(
                f"the training set has {len(dataset)} samples, fewer than one global batch of "
                f"{batch_size * num_processes} (train_batch_size {batch_size} x {num_processes} processes); use a "
                f"smaller batch or dataset_repeats > 1"
            )
        self.dataset, self.batch_size, self.num_processes, self.rank = dataset, batch_size, num_processes, rank
        self.seed, self.num_workers, self.pin_memory = seed, num_workers, pin_memory
        self.batches_per_epoch = per_epoch
        self.epoch, self.batch = 0, 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            sampler = GlobalBatchSampler(
                len(self.dataset),
                self.batch_size,
                self.num_processes,
                self.rank,
                self.seed,
                self.epoch,
                start=self.batch,
            )
            loader = torch.utils.data.DataLoader(
                self.dataset,
                batch_sampler=sampler,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
                # Its own generator: a DataLoader draws its workers' base seed from the global RNG otherwise, which
                # would make the random state after a resume differ from the uninterrupted run's.
                generator=torch.Generator().manual_seed(self.seed + self.epoch),
            )
            for images in loader:
                self.batch += 1  # counted when handed out, so prefetched batches are not skipped on resume
                yield images
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class StreamingTrainBatches:
    """The endless sequence of this process's training batches from a streamed split (`datasets.IterableDataset`).

    Rows are read in order in this process and decoded and augmented by `num_threads` threads (PIL releases the
    GIL), so that the batches do not depend on the number of threads. Each epoch reshuffles the stream
    (`set_epoch`); the augmentation of the i-th row of an epoch depends on `(seed, epoch, rank, i)` only. On resume
    the stream reads and drops the rows this process had consumed in the current epoch (read, not decoded). An
    incomplete last batch of an epoch is dropped.

    `stream` should already be this process's share (`shard_stream`).
    """

    def __init__(
        self,
        stream: Any,
        image_column: str,
        transform: RandomCropTransform,
        batch_size: int,
        seed: int,
        rank: int,
        num_threads: int = 0,
    ):
        self.stream, self.image_column, self.transform = stream, image_column, transform
        self.batch_size, self.seed, self.rank, self.num_threads = batch_size, seed, rank, max(1, num_threads)
        self.epoch, self.position = 0, 0

    def _sample(self, epoch: int, position: int, row: dict) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, epoch, self.rank, position])
        image = to_pil(row[self.image_column], f"row {position} of epoch {epoch} of the training stream")
        return torch.from_numpy(self.transform(image, rng))

    def __iter__(self) -> Iterator[torch.Tensor]:
        lookahead = 2 * self.batch_size
        with ThreadPoolExecutor(self.num_threads) as pool:
            while True:
                epoch, start = self.epoch, self.position
                self.stream.set_epoch(epoch)
                # Not `stream.skip`: it turns off the shard shuffling, which changes the order of the rest.
                rows = itertools.islice(self.stream, start, None)
                pending: deque = deque()
                produced = False
                for position, row in enumerate(rows, start=start):
                    pending.append(pool.submit(self._sample, epoch, position, row))
                    while len(pending) >= lookahead:
                        batch = [pending.popleft().result() for _ in range(self.batch_size)]
                        self.position += self.batch_size
                        produced = True
                        yield torch.stack(batch)
                while len(pending) >= self.batch_size:
                    batch = [pending.popleft().result() for _ in range(self.batch_size)]
                    self.position += self.batch_size
                    produced = True
                    yield torch.stack(batch)
                if not produced and start == 0:
                    raise ValueError(f"the training stream has fewer than train_batch_size={self.batch_size} images")
                self.epoch, self.position = epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def shard_stream(stream: Any, rank: int, num_processes: int, seed: int, shuffle_buffer_size: int = 1000) -> Any:
    """This process's share of a streamed split, shuffled with a buffer (reshuffled per epoch by `set_epoch`)."""
    from datasets.distributed import split_dataset_by_node

    if num_processes > 1:
        stream = split_dataset_by_node(stream, rank=rank, world_size=num_processes)
    return stream.shuffle(seed=seed, buffer_size=shuffle_buffer_size) if shuffle_buffer_size > 1 else stream


# ---------------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class ImageSplits:
    """What `load_image_splits` returns. `train` is an `ImageList`, or a `datasets.IterableDataset` when streaming
    (`streaming=True`); `validation` is always an `ImageList` in memory or on disk."""

    train: Any
    validation: ImageList
    image_column: str | None
    streaming: bool = False
    description: str = ""


def load_image_splits(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | None = None,
    image_column: str = "image",
    train_split: str = "train",
    validation_split: str | None = None,
    num_validation_images: int = 256,
    streaming: bool = False,
    seed: int = 0,
    cache_dir: str | None = None,
) -> ImageSplits:
    """Load the training split and a held-out validation split.

    Exactly one of `dataset_name` (a Hub dataset, or a `builtin:` set) and `train_data_dir` (a local imagefolder).
    The validation split is `validation_split` if given, else the dataset's "validation" split, else its "test" split,
    else `num_validation_images` images held out from the training split (a seeded random choice; with streaming, the
    first ones). At most `num_validation_images` validation images are used.

    Raises a `ValueError` naming the problem for: both or neither source, a missing image column, an empty split.
    """
    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            "pass exactly one data source: dataset_name (a Hub dataset or one of "
            f"{', '.join(BUILTIN_DATASETS)}) or train_data_dir (a local folder of images); got "
            f"dataset_name={dataset_name!r}, train_data_dir={train_data_dir!r}"
        )
    if num_validation_images < 1:
        raise ValueError(f"num_validation_images must be >= 1, got {num_validation_images}")
    if dataset_name is not None and dataset_name.startswith(BUILTIN_PREFIX):
        return _load_builtin(dataset_name, num_validation_images)
    if train_data_dir is not None and not os.path.isdir(train_data_dir):
        raise ValueError(f"train_data_dir {train_data_dir!r} is not a directory")

    import datasets

    if train_data_dir is not None:
        source, kwargs, description = "imagefolder", {"data_dir": train_data_dir}, f"imagefolder {train_data_dir!r}"
    else:
        source, kwargs, description = dataset_name, {"name": dataset_config_name}, f"dataset {dataset_name!r}"
    try:
        splits = datasets.load_dataset(source, cache_dir=cache_dir, streaming=streaming, **kwargs)
    except datasets.data_files.EmptyDatasetError as error:
        raise ValueError(f"{description} holds no image files ({error})") from error
    if train_split not in splits:
        raise ValueError(f"train_split {train_split!r} is not a split of {description}: {sorted(splits)}")
    if validation_split is not None and validation_split not in splits:
        raise ValueError(f"validation_split {validation_split!r} is not a split of {description}: {sorted(splits)}")
    if validation_split is None:
        validation_split = next((name for name in ("validation", "test") if name in splits), None)

    train = splits[train_split]
    _check_column(train, image_column, f"split {train_split!r} of {description}")
    if validation_split is not None:
        validation = splits[validation_split]
        _check_column(validation, image_column, f"split {validation_split!r} of {description}")
        validation = _head(validation, num_validation_images)
    elif streaming:
        validation = _head(train, num_validation_images)
        train = train.skip(num_validation_images)
    else:
        if len(train) <= num_validation_images:
            raise ValueError(
                f"{description} has {len(train)} training images and no validation split: cannot hold out "
                f"num_validation_images={num_validation_images}; lower it or add a validation split"
            )
        held_out = train.train_test_split(test_size=num_validation_images, seed=seed, shuffle=True)
        train, validation = held_out["train"], held_out["test"]
    validation = _undecoded(validation, image_column)
    if len(validation) == 0:
        raise ValueError(f"the validation split of {description} is empty")
    validation_list = ImageList(validation, image_column, f"the validation split of {description}")
    if streaming:
        return ImageSplits(_undecoded(train, image_column), validation_list, image_column, True, description)
    if len(train) == 0:
        raise ValueError(f"split {train_split!r} of {description} is empty")
    train_list = ImageList(_undecoded(train, image_column), image_column, f"split {train_split!r} of {description}")
    return ImageSplits(train_list, validation_list, image_column, False, description)


def _check_column(split: Any, image_column: str, where: str) -> None:
    columns = split.column_names
    if columns is None:  # some streamed datasets only know their columns after the first row
        first = next(iter(split), None)
        if first is None:
            raise ValueError(f"{where} is empty")
        columns = list(first)
    if image_column not in columns:
        raise ValueError(f"image_column {image_column!r} is not a column of {where}; its columns are {columns}")


def _head(split: Any, count: int) -> Any:
    """The first `count` rows, as an in-memory or memory-mapped `datasets.Dataset`."""
    import datasets

    if isinstance(split, datasets.IterableDataset):
        rows = list(split.take(count))
        if not rows:
            return datasets.Dataset.from_dict({})
        return datasets.Dataset.from_list(rows, features=split.features)
    return split.select(range(min(count, len(split))))


def _undecoded(split: Any, image_column: str) -> Any:
    # Decode ourselves (`to_pil`): an unreadable file then raises an error that names it.
    import datasets

    feature = (split.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return split.cast_column(image_column, datasets.Image(decode=False))
    return split


def check_images(images: ImageList, count: int) -> None:
    """Decode the first `count` images (all when `count` is negative); the first unreadable one raises a
    `ValueError` naming it. Run before training, so that a bad file fails the run at once, not hours later."""
    total = len(images) if count < 0 else min(count, len(images))
    for index in range(total):
        images[index]


# ---------------------------------------------------------------------------------------------------------------------
# Built-in offline sets
# ---------------------------------------------------------------------------------------------------------------------
def _load_builtin(name: str, num_validation_images: int) -> ImageSplits:
    if name == SKIMAGE_PHOTOS:
        train, validation = skimage_photos()
        description = (
            f"{len(train)} scikit-image sample photos for training, "
            f"{len(SKIMAGE_VALIDATION_PHOTOS)} held out ({', '.join(SKIMAGE_VALIDATION_PHOTOS)})"
        )
    elif name == DIGITS:
        train, validation = sklearn_digits()
        description = f"scikit-learn digits: {len(train)} for training, {len(validation)} held out"
    else:
        raise ValueError(f"unknown built-in dataset {name!r}; choose among {BUILTIN_DATASETS}")
    return ImageSplits(ImageList(train), ImageList(validation[:num_validation_images]), None, False, description)


def skimage_photos(validation_tile_fraction: float = 1 / 6) -> tuple[list[PIL.Image.Image], list[PIL.Image.Image]]:
    """The training photos (whole, for random crops) and the validation tiles of the held-out photos.

    Every photo is rescaled so that its shorter side is `SKIMAGE_SHORTER_SIDE` pixels. The held-out photos are cut
    into non-overlapping square tiles of side `validation_tile_fraction` times the shorter side, each a validation
    image, taken from the held-out photos in turn.
    """
    try:
        from skimage import data
    except ImportError as error:
        raise ImportError(
            f"the built-in dataset {SKIMAGE_PHOTOS!r} needs scikit-image: pip install 'optvq-hf[demo]'"
        ) from error

    def load(name: str) -> PIL.Image.Image:
        array = getattr(data, name)()
        if name == "stereo_motorcycle":
            array = array[0]  # (left, right, disparity): the right view is nearly the same photo
        image = PIL.Image.fromarray(array).convert("RGB")
        scale = SKIMAGE_SHORTER_SIDE / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        return image.resize(size, _RESAMPLE)

    train = [load(name) for name in SKIMAGE_TRAIN_PHOTOS]
    side = round(SKIMAGE_SHORTER_SIDE * validation_tile_fraction)
    per_photo = []
    for name in SKIMAGE_VALIDATION_PHOTOS:
        photo = load(name)
        per_photo.append(
            [
                photo.crop((left, top, left + side, top + side))
                for top in range(0, photo.height - side + 1, side)
                for left in range(0, photo.width - side + 1, side)
            ]
        )
    # Interleaved (a tile of each photo in turn), so that the first n tiles sample every held-out photo.
    tiles = [tile for group in itertools.zip_longest(*per_photo) for tile in group if tile is not None]
    return train, tiles


def load_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1797 handwritten digits: images (N, 8, 8) as floats 0..16 (17 grey levels) and labels (N,).
    The one loader of the digits for every script, benchmark and metric."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError("the digits data need scikit-learn: pip install 'optvq-hf[demo]'") from error
    digits = load_digits()
    return digits.images, digits.target


def digits_to_pil(images: np.ndarray) -> list[PIL.Image.Image]:
    """Digits of `load_sklearn_digits` as 8-bit grayscale images (0..16 -> 0..255)."""
    return [PIL.Image.fromarray(np.round(image * (255.0 / 16.0)).astype(np.uint8), mode="L") for image in images]


def sklearn_digits() -> tuple[list[PIL.Image.Image], list[PIL.Image.Image]]:
    """scikit-learn's 1797 handwritten digits (8x8, 17 gray levels) as grayscale images; the last 297 held out."""
    pil = digits_to_pil(load_sklearn_digits()[0])
    return pil[:-DIGITS_VALIDATION_COUNT], pil[-DIGITS_VALIDATION_COUNT:]


__all__ = [
    "digits_to_pil",
    "load_sklearn_digits",
    "BUILTIN_DATASETS",
    "GlobalBatchSampler",
    "ImageList",
    "ImageSplits",
    "RandomCropTransform",
    "StreamingTrainBatches",
    "TrainBatches",
    "TrainImages",
    "ValidationImages",
    "check_images",
    "load_image_splits",
    "shard_stream",
    "skimage_photos",
    "sklearn_digits",
    "to_pil",
]
