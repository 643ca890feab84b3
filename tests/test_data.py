"""Training data: transforms with exact values, a batch order that resumes exactly and splits over processes without
changing the global batch, loading (imagefolder, held-out or given validation split, streaming, built-in photos), and
clear errors for a missing column, an empty folder and unreadable files."""

import numpy as np
import PIL.Image
import pytest
import torch

from optvq_hf.training.data import (
    SKIMAGE_TRAIN_PHOTOS,
    SKIMAGE_VALIDATION_PHOTOS,
    GlobalBatchSampler,
    ImageList,
    RandomCropTransform,
    StreamingTrainBatches,
    TrainBatches,
    TrainImages,
    check_images,
    load_image_splits,
    shard_stream,
    skimage_photos,
    to_pil,
)


def smooth_image(seed: int, size=(40, 48)) -> PIL.Image.Image:
    coarse = np.random.default_rng(seed).integers(0, 256, size=(size[0] // 8, size[1] // 8, 3), dtype=np.uint8)
    return PIL.Image.fromarray(coarse).resize((size[1], size[0]), PIL.Image.Resampling.BILINEAR)


@pytest.fixture
def image_folder(tmp_path):
    for i in range(6):
        smooth_image(i).save(tmp_path / f"image_{i}.png")
    return tmp_path


# ---------------------------------------------------------------------------------------------------------- transforms
def test_full_scale_crop_of_a_square_image_is_the_image_or_its_mirror():
    image = smooth_image(0, size=(16, 16))
    expected = np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
    transform = RandomCropTransform(16, scale=(1.0, 1.0), flip=True)
    outputs = [transform(image, np.random.default_rng(seed)) for seed in range(12)]
    flipped = [np.allclose(out, expected[:, :, ::-1], atol=1e-6) for out in outputs]
    kept = [np.allclose(out, expected, atol=1e-6) for out in outputs]
    assert all(f or k for f, k in zip(flipped, kept))
    assert any(flipped) and any(kept)  # both happen
    assert all(out.dtype == np.float32 and out.shape == (3, 16, 16) for out in outputs)


def test_crop_scale_controls_the_crop_size():
    # A horizontal ramp: a crop of side s spans s / width of its range of values.
    ramp = PIL.Image.fromarray(np.tile(np.arange(256, dtype=np.uint8), (256, 1))).convert("RGB")
    small = RandomCropTransform(8, scale=(1 / 16, 1 / 16), flip=False)(ramp, np.random.default_rng(0))
    large = RandomCropTransform(8, scale=(1.0, 1.0), flip=False)(ramp, np.random.default_rng(0))
    span = lambda out: (out[0, 4].max() - out[0, 4].min()) * 127.5  # noqa: E731 - gray levels across the row
    assert span(large) == pytest.approx(256 * 7 / 8, rel=0.1)
    assert span(small) == pytest.approx(64 * 7 / 8, rel=0.15)  # a quarter of the side
    assert np.abs(large).max() <= 1.0


def test_grayscale_transform_and_bad_scale():
    out = RandomCropTransform(8, num_channels=1)(smooth_image(1), np.random.default_rng(0))
    assert out.shape == (1, 8, 8)
    with pytest.raises(ValueError, match="train_crop_scale"):
        RandomCropTransform(8, scale=(0.5, 0.2))


def test_augmentation_depends_only_on_seed_epoch_and_index():
    images = ImageList([smooth_image(i) for i in range(3)])
    dataset = TrainImages(images, RandomCropTransform(16, scale=(0.3, 1.0)), seed=7, repeats=2)
    assert len(dataset) == 6
    assert torch.equal(dataset[(0, 4)], dataset[(0, 4)])
    assert not torch.equal(dataset[(0, 4)], dataset[(1, 4)])  # another epoch, another crop
    assert not torch.equal(dataset[(0, 1)], dataset[(0, 4)])  # the repeat of image 1 gets its own crop
    other_seed = TrainImages(images, RandomCropTransform(16, scale=(0.3, 1.0)), seed=8)
    assert not torch.equal(dataset[(0, 1)], other_seed[(0, 1)])


# ---------------------------------------------------------------------------------------------------- order of batches
def test_processes_split_the_single_process_global_batch():
    single = list(GlobalBatchSampler(23, batch_size=6, num_processes=1, rank=0, seed=3, epoch=2))
    ranks = [list(GlobalBatchSampler(23, batch_size=3, num_processes=2, rank=r, seed=3, epoch=2)) for r in range(2)]
    assert len(single) == 3  # 23 // 6: the incomplete last global batch is dropped
    assert [a + b for a, b in zip(*ranks)] == single
    indices = [index for batch in single for _, index in batch]
    assert len(set(indices)) == 18 and all(0 <= i < 23 for i in indices)
    assert {epoch for batch in single for epoch, _ in batch} == {2}
    next_epoch = list(GlobalBatchSampler(23, batch_size=6, num_processes=1, rank=0, seed=3, epoch=3))
    assert [i for _, i in next_epoch[0]] != [i for _, i in single[0]]
    resumed = list(GlobalBatchSampler(23, batch_size=6, num_processes=1, rank=0, seed=3, epoch=2, start=2))
    assert resumed == single[2:]


@pytest.mark.parametrize("taken", [1, 4, 5])  # inside the first epoch, at its end, inside the second
def test_train_batches_resume_exactly(taken):
    images = ImageList([smooth_image(i) for i in range(5)])
    dataset = TrainImages(images, RandomCropTransform(8, scale=(0.2, 1.0)), seed=1, repeats=2)
    reference = TrainBatches(dataset, batch_size=2, num_processes=1, rank=0, seed=1)
    assert reference.batches_per_epoch == 5
    stream = iter(reference)
    first = [next(stream) for _ in range(taken)]
    state = reference.state_dict()
    expected = [next(stream) for _ in range(4)]
    resumed = TrainBatches(dataset, batch_size=2, num_processes=1, rank=0, seed=1)
    resumed.load_state_dict(state)
    got = [batch for batch, _ in zip(resumed, range(4))]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert not torch.equal(first[0], expected[0])


def test_too_few_images_for_one_global_batch():
    dataset = TrainImages(ImageList([smooth_image(0)] * 3), RandomCropTransform(8), seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        TrainBatches(dataset, batch_size=2, num_processes=2, rank=0, seed=0)


# ------------------------------------------------------------------------------------------------------------- loading
def test_imagefolder_holds_out_a_seeded_validation_split(image_folder):
    splits = load_image_splits(train_data_dir=str(image_folder), num_validation_images=2, seed=0)
    assert (len(splits.train), len(splits.validation)) == (4, 2)
    again = load_image_splits(train_data_dir=str(image_folder), num_validation_images=2, seed=0)
    train_pixels = {np.asarray(splits.train[i]).tobytes() for i in range(4)}
    validation_pixels = {np.asarray(splits.validation[i]).tobytes() for i in range(2)}
    assert not train_pixels & validation_pixels  # held out, not shared
    assert validation_pixels == {np.asarray(again.validation[i]).tobytes() for i in range(2)}
    assert splits.train[0].size == (48, 40)


def test_imagefolder_validation_subfolder_is_used(tmp_path):
    for split, count in (("train", 3), ("validation", 2)):
        (tmp_path / split).mkdir()
        for i in range(count):
            smooth_image(10 * count + i).save(tmp_path / split / f"{i}.png")
    splits = load_image_splits(train_data_dir=str(tmp_path), num_validation_images=8)
    assert (len(splits.train), len(splits.validation)) == (3, 2)


def test_clear_errors_before_training(image_folder, tmp_path):
    with pytest.raises(ValueError, match="image_column 'img' is not a column.*'image'"):
        load_image_splits(train_data_dir=str(image_folder), image_column="img", num_validation_images=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        load_image_splits(train_data_dir=str(empty))
    with pytest.raises(ValueError, match="exactly one data source"):
        load_image_splits(dataset_name="x", train_data_dir=str(image_folder))
    with pytest.raises(ValueError, match="cannot hold out"):
        load_image_splits(train_data_dir=str(image_folder), num_validation_images=6)


def test_unreadable_image_is_named(image_folder):
    (image_folder / "image_1.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    splits = load_image_splits(train_data_dir=str(image_folder), num_validation_images=1, seed=0)
    with pytest.raises(ValueError, match=r"unreadable image at .*image_1\.png"):
        check_images(splits.train, -1)
        check_images(splits.validation, -1)
    with pytest.raises(ValueError, match="unreadable image at sample 3"):
        to_pil({"bytes": b"garbage", "path": None}, "sample 3")


def test_streaming_imagefolder_resumes_exactly(image_folder):
    splits = load_image_splits(train_data_dir=str(image_folder), num_validation_images=2, streaming=True, seed=0)
    assert splits.streaming and len(splits.validation) == 2
    stream = shard_stream(splits.train, rank=0, num_processes=1, seed=0, shuffle_buffer_size=4)

    def batches():
        return StreamingTrainBatches(
            stream, "image", RandomCropTransform(8, scale=(0.2, 1.0)), batch_size=1, seed=0, rank=0, num_threads=2
        )

    reference = batches()
    iterator = iter(reference)
    epoch_one = [next(iterator) for _ in range(4)]  # 6 images - 2 held out = one epoch
    next(iterator)
    state = reference.state_dict()
    assert state == {"epoch": 1, "position": 1}
    expected = [next(iterator) for _ in range(5)]
    resumed = batches()
    resumed.load_state_dict(state)
    got = [batch for batch, _ in zip(resumed, range(5))]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    assert len({tuple(b.flatten().tolist()) for b in epoch_one}) == 4


def test_builtin_photos_hold_out_whole_photos():
    train, validation = skimage_photos()
    assert len(train) == len(SKIMAGE_TRAIN_PHOTOS) and not set(SKIMAGE_TRAIN_PHOTOS) & set(SKIMAGE_VALIDATION_PHOTOS)
    assert all(min(photo.size) == 384 and photo.mode == "RGB" for photo in train)
    # coffee (384 x 576) and camera (384 x 384) in 64-pixel tiles, alternating: 54 + 36.
    assert len(validation) == 90 and {tile.size for tile in validation} == {(64, 64)}
    coffee, camera = np.asarray(validation[0]), np.asarray(validation[1])
    assert coffee.std(axis=2).mean() > 5 and camera.std(axis=2).mean() == 0  # colour, then grayscale
    splits = load_image_splits(dataset_name="builtin:skimage-photos", num_validation_images=10)
    assert len(splits.validation) == 10 and np.array_equal(np.asarray(splits.validation[3]), np.asarray(validation[3]))
    digits = load_image_splits(dataset_name="builtin:digits")
    assert (len(digits.train), digits.train[0].size, digits.train[0].mode) == (1500, (8, 8), "L")
    with pytest.raises(ValueError, match="unknown built-in dataset"):
        load_image_splits(dataset_name="builtin:nope")
