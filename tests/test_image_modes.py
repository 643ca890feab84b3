"""Every PIL mode and numpy dtype against hand-computed values in [0, 1] (and [-1, 1] after `2x - 1`)."""

import numpy as np
import PIL.Image
import pytest

from optvq_hf.image_modes import to_pil_image, to_unit_array
from optvq_hf.training.data import RandomCropTransform


def pixel(image, num_channels=3):
    return to_unit_array(image, num_channels)[0, 0]


def test_sixteen_bit_grey_scaled_by_65535():
    image = PIL.Image.fromarray(np.full((2, 2), 30000, dtype=np.uint16))
    assert image.mode == "I;16"
    # 30000 / 65535 = 0.457771; in [-1, 1]: 2 * 0.457771 - 1 = -0.084459
    np.testing.assert_allclose(pixel(image), [0.457771] * 3, atol=1e-6)
    np.testing.assert_allclose(2 * pixel(image, 1) - 1, [-0.084459], atol=1e-6)


@pytest.mark.parametrize("mode", ["I;16B", "I;16L", "I;16N"])
def test_sixteen_bit_variants(mode):
    image = PIL.Image.new(mode, (2, 2), 65535)
    np.testing.assert_allclose(pixel(image, 1), [1.0])
    image = PIL.Image.new(mode, (2, 2), 13107)  # 13107 / 65535 = 0.2 exactly
    np.testing.assert_allclose(pixel(image, 1), [0.2], atol=1e-7)


def test_mode_i_rule_and_refusal():
    image = PIL.Image.fromarray(np.full((2, 2), 6553, dtype=np.int32))
    assert image.mode == "I"
    np.testing.assert_allclose(pixel(image, 1), [6553 / 65535], rtol=1e-6)
    with pytest.raises(ValueError, match=r"mode 'I'.*\[0, 65535\].*70000"):
        to_unit_array(PIL.Image.fromarray(np.full((2, 2), 70000, dtype=np.int32)))
    with pytest.raises(ValueError, match=r"mode 'I'.*-5"):
        to_unit_array(PIL.Image.fromarray(np.full((2, 2), -5, dtype=np.int32)))


def test_mode_f_rule_and_refusal():
    image = PIL.Image.fromarray(np.full((2, 2), 0.25, dtype=np.float32))
    assert image.mode == "F"
    np.testing.assert_allclose(pixel(image), [0.25] * 3)
    with pytest.raises(ValueError, match=r"mode 'F'.*255"):
        to_unit_array(PIL.Image.fromarray(np.full((2, 2), 255.0, dtype=np.float32)))
    with pytest.raises(ValueError, match=r"mode 'F'.*nan"):
        to_unit_array(PIL.Image.fromarray(np.full((2, 2), np.nan, dtype=np.float32)))


def test_eight_bit_modes():
    np.testing.assert_allclose(pixel(PIL.Image.new("L", (1, 1), 51)), [0.2] * 3, atol=1e-7)
    np.testing.assert_allclose(pixel(PIL.Image.new("1", (1, 1), 1)), [1.0] * 3)
    np.testing.assert_allclose(pixel(PIL.Image.new("RGB", (1, 1), (255, 0, 51))), [1.0, 0.0, 0.2], atol=1e-7)
    # 1-channel grey from RGB by 601 luma: 0.299 * 1 + 0.114 * 0.2 = 0.3218
    np.testing.assert_allclose(pixel(PIL.Image.new("RGB", (1, 1), (255, 0, 51)), 1), [0.3218], atol=1e-6)
    cmyk = PIL.Image.new("CMYK", (1, 1), (0, 255, 0, 0))  # magenta
    np.testing.assert_allclose(pixel(cmyk), [1.0, 0.0, 1.0])
    ycbcr = PIL.Image.new("RGB", (1, 1), (10, 200, 30)).convert("YCbCr")
    np.testing.assert_allclose(pixel(ycbcr) * 255, [10, 200, 30], atol=3)
    palette = PIL.Image.new("RGB", (1, 1), (0, 102, 255)).convert("P")
    np.testing.assert_allclose(pixel(palette), [0.0, 0.4, 1.0], atol=1e-6)


def test_alpha_composited_on_white():
    # colour 0.2, alpha 0.6 (153): 0.2 * 0.6 + 0.4 = 0.52
    np.testing.assert_allclose(pixel(PIL.Image.new("LA", (1, 1), (51, 153))), [0.52] * 3, atol=1e-6)
    rgba = PIL.Image.new("RGBA", (1, 1), (0, 51, 255, 0))  # fully transparent -> white
    np.testing.assert_allclose(pixel(rgba), [1.0] * 3)
    rgba = PIL.Image.new("RGBA", (1, 1), (0, 51, 255, 153))
    np.testing.assert_allclose(pixel(rgba), [0.4, 0.52, 1.0], atol=1e-6)
    pa = PIL.Image.new("RGBA", (1, 1), (0, 51, 255, 0)).convert("PA")
    np.testing.assert_allclose(pixel(pa), [1.0] * 3)


def test_forty_eight_bit_png(tmp_path):
    path = tmp_path / "rgb48.png"
    # A 48-bit RGB PNG written by hand (PIL cannot write one): 1x1, colour type 2, bit depth 16.
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"\x00" + struct.pack(">HHH", 65535, 0, 13107)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 16, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(png)
    with PIL.Image.open(path) as image:
        np.testing.assert_allclose(pixel(image), [1.0, 0.0, 0.2], atol=1 / 255)


def test_numpy_arrays():
    np.testing.assert_allclose(pixel(np.full((1, 1, 3), 51, np.uint8)), [0.2] * 3, atol=1e-7)
    np.testing.assert_allclose(pixel(np.full((1, 1), 30000, np.uint16), 1), [0.457771], atol=1e-6)
    np.testing.assert_allclose(pixel(np.full((1, 1, 3), 0.5, np.float64)), [0.5] * 3)
    with pytest.raises(ValueError, match=r"float64.*\[0, 1\].*inf"):
        to_unit_array(np.full((1, 1, 3), np.inf))
    with pytest.raises(ValueError, match=r"shape.*\(1, 1, 5\)"):
        to_unit_array(np.zeros((1, 1, 5), np.uint8))
    with pytest.raises(TypeError, match="complex"):
        to_unit_array(np.zeros((1, 1, 3), np.complex64))
    with pytest.raises(TypeError, match="PIL image or a numpy array"):
        to_unit_array([[0]])
    with pytest.raises(ValueError, match="num_channels must be 1 or 3"):
        to_unit_array(np.zeros((1, 1), np.uint8), 2)


def test_training_transform_uses_real_range():
    image = PIL.Image.fromarray(np.full((8, 8), 30000, dtype=np.uint16))
    out = RandomCropTransform(resolution=4, flip=False, num_channels=1)(image, np.random.default_rng(0))
    # 30000 / 65535 * 255 = 116.73 -> 117 -> 117 / 127.5 - 1 = -0.082353 (8-bit rounding of -0.0845)
    np.testing.assert_allclose(out, np.full((1, 4, 4), 117 / 127.5 - 1), atol=1e-6)
    assert to_pil_image(PIL.Image.new("RGB", (1, 1))).mode == "RGB"
