"""OptVQImageProcessor: inputs of every kind -> pixel_values in [-1, 1], and back to images."""

import numpy as np
import PIL.Image
import pytest
import torch

from optvq_hf import OptVQConfig, OptVQImageProcessor


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
    assert (loaded.resolution, loaded.num_channels, loaded.resample) == (32, 3, "bicubic")


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.full((8, 8, 3), 2.0, dtype=np.float32), r"\[0, 1\]"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), "finite values"),
        (np.zeros((8, 8, 5), dtype=np.uint8), "shape"),
        (np.zeros((8, 8, 3), dtype=np.int64), "dtype|ambiguous"),
        ("not an image", "unsupported image type"),
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
