"""OptVQImageProcessor: inputs of every kind -> pixel_values in [-1, 1], and back to images."""

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import AutoImageProcessor
from transformers.image_utils import PILImageResampling, SizeDict

from optvq_hf import OptVQConfig, OptVQImageProcessor
from optvq_hf.image_modes import to_pil_image
from optvq_hf.opencv_resize import opencv_bilinear_resize

REFERENCE = Path(__file__).parent / "fixtures" / "image_processor_reference.npz"


def gradient_image(width: int = 64, height: int = 48) -> np.ndarray:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None, None]
    return (
        np.concatenate(
            [
                np.broadcast_to(x, (height, width, 1)),
                np.broadcast_to(y, (height, width, 1)),
                np.full((height, width, 1), 128.0, dtype=np.float32),
            ],
            axis=2,
        )
        .round()
        .astype(np.uint8)
    )


def test_resize_shorter_side_then_center_crop():
    processor = OptVQImageProcessor(resolution=24)
    pixel_values = processor(PIL.Image.fromarray(gradient_image()))["pixel_values"]
    assert pixel_values.shape == (1, 3, 24, 24) and pixel_values.dtype == torch.float32
    assert pixel_values.min() >= -1 and pixel_values.max() <= 1
    # 64x48 -> 32x24 (shorter side 24) -> central 24 columns: the red ramp keeps increasing left to right.
    assert (pixel_values[0, 0, 0, 1:] >= pixel_values[0, 0, 0, :-1]).all()
    assert pixel_values[0, 2].sub(128 / 127.5 - 1).abs().max() < 1e-6  # constant channel survives exactly


def test_no_resize_is_an_exact_affine_map():
    array = np.random.default_rng(0).integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    processor = OptVQImageProcessor(resolution=16, do_resize=False)
    pixel_values = processor(array)["pixel_values"][0]
    assert torch.allclose(pixel_values, torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1)
    back = processor.postprocess(pixel_values[None], output_type="np")
    assert back.dtype == np.uint8 and np.array_equal(back[0], array)
    assert np.array_equal(np.asarray(processor.postprocess(pixel_values)[0]), array)


def test_same_result_for_pil_numpy_and_tensor_inputs():
    array = gradient_image(40, 40)
    processor = OptVQImageProcessor(resolution=32)
    from_pil = processor(PIL.Image.fromarray(array))["pixel_values"]
    from_numpy = processor(array)["pixel_values"]
    from_float = processor(array.astype(np.float32) / 255.0)["pixel_values"]
    from_tensor = processor(torch.from_numpy(array).permute(2, 0, 1))["pixel_values"]
    from_batch = processor(torch.from_numpy(array).permute(2, 0, 1)[None].repeat(2, 1, 1, 1))["pixel_values"]
    for other in (from_numpy, from_float, from_tensor, from_batch[:1], from_batch[1:]):
        assert torch.equal(from_pil, other)


def test_list_of_images_and_grayscale():
    processor = OptVQImageProcessor(resolution=8, num_channels=1)
    pixel_values = processor([gradient_image(10, 8), gradient_image(8, 12)])["pixel_values"]
    assert pixel_values.shape == (2, 1, 8, 8)
    images = processor.postprocess(pixel_values)
    assert [image.mode for image in images] == ["L", "L"]


def test_postprocess_clips_out_of_range_values():
    processor = OptVQImageProcessor(resolution=2)
    out = processor.postprocess(torch.tensor([-3.0, 3.0, 0.0, -1.0]).reshape(1, 1, 2, 2).repeat(1, 3, 1, 1), "np")
    assert out[0, :, :, 0].tolist() == [[0, 255], [128, 0]]


def test_save_and_load(tmp_path):
    processor = OptVQImageProcessor.from_model_config(
        OptVQConfig(
            resolution=32, base_channels=32, channel_multipliers=(1, 2), latent_channels=32, embed_dim=32, num_codes=64
        )
    )
    processor.save_pretrained(tmp_path)
    loaded = OptVQImageProcessor.from_pretrained(tmp_path)
    assert (loaded.resolution, loaded.num_channels, loaded.resample) == (32, 3, PILImageResampling.BICUBIC)
    assert loaded.size == SizeDict(shortest_edge=32) and loaded.crop_size == SizeDict(height=32, width=32)
    auto = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(auto) is OptVQImageProcessor and auto.resolution == 32


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((8, 8, 3), 2.0, dtype=np.float32), r"\[0, 1\]"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), "finite values"),
        (np.zeros((8, 8, 5), dtype=np.uint8), "shape"),
        (np.zeros((8, 8, 3), dtype=np.int64), "dtype|ambiguous"),
        (42, "unsupported image type"),
        ([np.zeros((8, 8, 3), dtype=np.uint8), 42], "unsupported image type"),
        ([], "no images"),
    ],
)
def test_bad_images_raise(image, message):
    with pytest.raises(ValueError, match=message):
        OptVQImageProcessor(resolution=8)(image)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="resample"):
        OptVQImageProcessor(resample="cubic")
    with pytest.raises(ValueError, match="smaller than the crop"):
        OptVQImageProcessor(resolution=16, do_resize=False)(np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="image of size 8x20 is smaller than the crop 16x16"):
        OptVQImageProcessor(resolution=16, do_resize=False).pixel_array([np.zeros((20, 8, 3), dtype=np.uint8)])
    with pytest.raises(ValueError, match="output_type"):
        OptVQImageProcessor().postprocess(torch.zeros(1, 3, 2, 2), output_type="torch")


def test_sixteen_bit_and_float_images_are_scaled_by_their_range_not_clipped():
    processor = OptVQImageProcessor(resolution=8)
    sixteen = PIL.Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    expected = round(30000 / 65535 * 255) / 127.5 - 1.0  # -0.0824 after the 8-bit resize path (-0.0845 exact)
    assert np.allclose(processor(sixteen)["pixel_values"].numpy(), expected, atol=1e-6)
    as_float = PIL.Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32), mode="F")
    assert np.allclose(processor(as_float)["pixel_values"].numpy(), round(0.25 * 255) / 127.5 - 1.0, atol=1e-6)
    with pytest.raises(ValueError, match="no pixels"):
        processor(PIL.Image.new("RGB", (0, 5)))


def reference_inputs() -> dict[str, np.ndarray]:
    """The inputs of tests/fixtures/image_processor_reference.npz (outputs of the processor this one replaced)."""
    rng = np.random.default_rng(1234)
    cases = {}
    for width, height in [(40, 30), (17, 23), (64, 64), (24, 24), (100, 33), (31, 57)]:
        cases[f"rgb_{width}x{height}"] = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    cases["rgba_45x29"] = rng.integers(0, 256, size=(29, 45, 4), dtype=np.uint8)
    cases["gray_33x26"] = rng.integers(0, 256, size=(26, 33), dtype=np.uint8)
    return cases


@pytest.mark.parametrize("resolution", [16, 24])
def test_pixel_values_bit_identical_to_the_previous_processor(resolution):
    reference = np.load(REFERENCE)
    cases = reference_inputs()
    processor = OptVQImageProcessor(resolution=resolution)
    for name, array in cases.items():
        image = PIL.Image.fromarray(array, "RGBA") if array.ndim == 3 and array.shape[-1] == 4 else None
        image = PIL.Image.fromarray(array) if image is None else image
        for suffix, source in (("", image), ("_np", array)):
            out = processor(source, return_tensors="np")["pixel_values"][0]
            expected = reference[f"{name}_r{resolution}{suffix}"]
            assert out.dtype == expected.dtype == np.float32 and np.array_equal(out, expected), name + suffix
    gray = OptVQImageProcessor(resolution=resolution, num_channels=1)
    out = gray(PIL.Image.fromarray(cases["rgb_40x30"]), return_tensors="np")["pixel_values"][0]
    assert np.array_equal(out, reference[f"gray1_r{resolution}"])


def test_shortest_edge_resize_rounds_the_long_side():
    # 17x23 -> shorter side 16: 23 * 16 / 17 = 21.65 -> 22 columns (transformers' default truncates to 21).
    processor = OptVQImageProcessor(resolution=16, do_center_crop=False)
    assert processor(np.zeros((23, 17, 3), dtype=np.uint8))["pixel_values"].shape == (1, 3, 22, 16)


def test_standard_kwargs():
    array = gradient_image(40, 30)
    processor = OptVQImageProcessor(resolution=16)
    base = processor(array)["pixel_values"]
    # Hand-worked: no rescale / normalize gives the uint8 values, no resize + crop of 16x16 the central pixels.
    raw = processor(array, do_rescale=False, do_normalize=False)["pixel_values"]
    assert raw.dtype == torch.uint8 and torch.equal(raw.float() / 127.5 - 1, base)
    crop = processor(array, do_resize=False, crop_size={"height": 10, "width": 12})["pixel_values"][0]
    expected = torch.from_numpy(array[10:20, 14:26]).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(crop, expected)
    unit = processor(array, rescale_factor=1 / 255, do_normalize=False)["pixel_values"]
    assert torch.allclose(unit, (base + 1) / 2, atol=1e-6)
    centred = processor(array, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], rescale_factor=1 / 255)
    assert torch.allclose(centred["pixel_values"], base, atol=1e-6)
    assert processor(array, size={"shortest_edge": 20}, crop_size=20)["pixel_values"].shape == (1, 3, 20, 20)
    assert processor(array, do_center_crop=False)["pixel_values"].shape == (1, 3, 16, 21)  # 40 * 16 / 30 = 21.3
    assert processor(array, size={"height": 8, "width": 12}, do_center_crop=False)["pixel_values"].shape[2:] == (8, 12)
    assert isinstance(processor(array, return_tensors="np")["pixel_values"], np.ndarray)
    assert processor(array, resample="nearest")["pixel_values"].shape == base.shape
    with pytest.raises(ValueError, match="do_convert_rgb"):
        processor(np.zeros((8, 8, 4), dtype=np.uint8), do_convert_rgb=False)
    assert torch.equal(processor(array, do_convert_rgb=False)["pixel_values"], base)


def test_channel_layouts_with_input_data_format():
    array = gradient_image(40, 30)
    processor = OptVQImageProcessor(resolution=16)
    base = processor(array)["pixel_values"]
    channels_first = np.ascontiguousarray(array.transpose(2, 0, 1))
    assert torch.equal(processor(channels_first, input_data_format="channels_first")["pixel_values"], base)
    assert torch.equal(processor(channels_first)["pixel_values"], base)  # inferred
    channels_last = torch.from_numpy(array)
    assert torch.equal(processor(channels_last, input_data_format="channels_last")["pixel_values"], base)
    # Ambiguous (3, 4, 3): the stated layout decides.
    tiny = np.arange(36, dtype=np.uint8).reshape(3, 4, 3)
    last = OptVQImageProcessor(resolution=3, do_resize=False)(tiny, input_data_format="channels_last")
    assert last["pixel_values"].shape == (1, 3, 3, 3)


def test_resolution_shorthand_and_setter():
    processor = OptVQImageProcessor(resolution=12, size={"shortest_edge": 14})
    assert processor.size == SizeDict(shortest_edge=14) and processor.crop_size == SizeDict(height=12, width=12)
    processor.resolution = 8
    assert processor(gradient_image())["pixel_values"].shape == (1, 3, 8, 8)
    assert processor(gradient_image(), resolution=4)["pixel_values"].shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="resolution"):
        OptVQImageProcessor(resolution=0)
    with pytest.raises(ValueError, match="num_channels"):
        OptVQImageProcessor(num_channels=2)


@pytest.mark.parametrize("num_channels", [3, 1])
def test_opencv_bilinear_is_the_transcription_then_crop_then_scale(num_channels):
    # 40 x 30 -> shorter side 16: 40 * 16 / 30 = 21.33 -> 21 columns (albumentations' SmallestMaxSize rounds the
    # same way); center crop 16: left (21 - 16) // 2 = 2, top 0; then x / 127.5 - 1.
    array = np.random.default_rng(3).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    source = np.asarray(to_pil_image(array, num_channels))  # the processor's channel conversion (image_modes)
    processor = OptVQImageProcessor(resolution=16, num_channels=num_channels, resample="opencv_bilinear")
    out = processor(array, return_tensors="np")["pixel_values"][0]
    resized = opencv_bilinear_resize(source, 16, 21)
    crop = resized[:, 2:18].reshape(16, 16, num_channels).transpose(2, 0, 1)
    assert out.shape == (num_channels, 16, 16)
    assert np.allclose(out, crop.astype(np.float64) / 127.5 - 1, atol=1e-6)
    assert np.array_equal(np.round((out.astype(np.float64) + 1) * 127.5).astype(np.uint8), crop)
    # The original's float values too: (image / 255).astype(float32), then torchvision Normalize(0.5, 0.5) in float32.
    original = ((crop / 255).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
    assert np.array_equal(out, original)
    # The same option at call time, and a real change from the default bicubic.
    assert np.array_equal(
        OptVQImageProcessor(resolution=16, num_channels=num_channels)(
            array, resample="opencv_bilinear", return_tensors="np"
        )["pixel_values"][0],
        out,
    )
    default = OptVQImageProcessor(resolution=16, num_channels=num_channels)(array, return_tensors="np")
    assert not np.array_equal(default["pixel_values"][0], out)
    # An explicit (height, width) size resizes to exactly that, with the same transcription.
    exact = processor(array, size={"height": 12, "width": 20}, do_center_crop=False, return_tensors="np")
    expected = opencv_bilinear_resize(source, 12, 20).reshape(12, 20, num_channels).transpose(2, 0, 1)
    assert np.allclose(exact["pixel_values"][0], expected / 127.5 - 1, atol=1e-6)


def test_opencv_bilinear_round_trips_through_save_and_load(tmp_path):
    processor = OptVQImageProcessor(resolution=16, resample="opencv_bilinear")
    assert processor.resample == "opencv_bilinear" and processor.to_dict()["resample"] == "opencv_bilinear"
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["resample"] == "opencv_bilinear"
    array = np.random.default_rng(4).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    expected = processor(array)["pixel_values"]
    for loaded in (OptVQImageProcessor.from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is OptVQImageProcessor and loaded.resample == "opencv_bilinear"
        assert loaded.to_dict() == processor.to_dict()
        assert torch.equal(loaded(array)["pixel_values"], expected)
    assert OptVQImageProcessor.from_dict(processor.to_dict()).resample == "opencv_bilinear"


def test_bad_resample_lists_the_options():
    options = r"\['bicubic', 'bilinear', 'box', 'hamming', 'lanczos', 'nearest', 'opencv_bilinear'\]"
    with pytest.raises(ValueError, match=options + " or a PILImageResampling, got 'opencv'"):
        OptVQImageProcessor(resample="opencv")
    with pytest.raises(ValueError, match=options):
        OptVQImageProcessor(resolution=8)(np.zeros((8, 8, 3), dtype=np.uint8), resample="cv2")
    with pytest.raises(ValueError, match=options):
        OptVQImageProcessor(resample=17)
    with pytest.raises(ValueError, match="opencv_bilinear.*shortest_edge"):
        OptVQImageProcessor(resample="opencv_bilinear", size={"shortest_edge": 8, "longest_edge": 12})(
            np.zeros((8, 10, 3), dtype=np.uint8), do_center_crop=False
        )


def mode_images() -> list[PIL.Image.Image]:
    """Images of several sizes (landscape, portrait, smaller and larger than the resolution) and modes."""
    rng = np.random.default_rng(1)
    images = []
    for (width, height), mode in zip(((37, 20), (20, 37), (16, 16), (90, 61)), ("RGB", "L", "RGBA", "P")):
        rgb = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
        images.append(rgb.quantize(16) if mode == "P" else rgb.convert(mode))
    return images


# The batched path (default scaling, per-channel mean and std) and the per-image one (no normalisation).
SCALINGS = [{}, {"image_mean": [0.5, 0.25, 0.75], "image_std": [0.5, 2.0, 0.3]}, {"do_normalize": False}]


@pytest.mark.parametrize("resample", [None, "bilinear", "opencv_bilinear"])
@pytest.mark.parametrize("num_channels", [3, 1])
@pytest.mark.parametrize("scaling", range(len(SCALINGS)))
def test_pixel_array_equals_preprocess_bit_for_bit(resample, num_channels, scaling):
    scaling = dict(SCALINGS[scaling])
    if num_channels == 1 and "image_mean" in scaling:
        scaling = {key: value[:1] for key, value in scaling.items()}
    processor = OptVQImageProcessor(resolution=18, resample=resample, num_channels=num_channels, **scaling)
    images = mode_images()
    for resolution in (None, 20):
        fast = processor.pixel_array(images, resolution=resolution)
        side = resolution or 18
        assert fast.shape == (len(images), num_channels, side, side) and fast.dtype == np.float32
        for image, pixels in zip(images, fast):
            kwargs = {} if resolution is None else {"resolution": resolution}
            expected = processor.preprocess(image, return_tensors=None, **kwargs)["pixel_values"][0]
            assert np.array_equal(pixels, expected)
    with pytest.raises(ValueError, match="no images"):
        processor.pixel_array([])


@pytest.mark.parametrize("settings", [{"do_resize": False}, {"do_resize": False, "do_center_crop": False}])
def test_pixel_array_without_resize_or_crop_equals_preprocess(settings):
    images = [
        PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (23, 30, 3), dtype=np.uint8))
        for seed in range(3)
    ]
    processor = OptVQImageProcessor(resolution=18, **settings)
    fast = processor.pixel_array(images)
    assert fast.shape == ((3, 3, 18, 18) if "do_center_crop" not in settings else (3, 3, 23, 30))
    for image, pixels in zip(images, fast):
        assert np.array_equal(pixels, processor.preprocess(image, return_tensors=None)["pixel_values"][0])
