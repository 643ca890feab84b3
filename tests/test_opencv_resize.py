"""optvq_hf.opencv_resize: OpenCV's INTER_LINEAR for uint8, bit for bit.

The hand-worked cases use OpenCV's arithmetic: source position (i + 0.5) * scale - 0.5, weights (1 - f, f) * 2048
rounded, horizontal pass row = p0 * w0 + p1 * w1, vertical pass
out = (((b0 * (row0 >> 4)) >> 16) + ((b1 * (row1 >> 4)) >> 16) + 2) >> 2. Each case has at least one pixel where a
float bilinear resize rounded to the nearest level (torch's interpolate, for one) gives another value, so a plain
bilinear implementation fails them even without OpenCV installed.
"""

import numpy as np
import pytest

from optvq_hf.opencv_resize import opencv_bilinear_resize


def test_halving_4x4_to_2x2_rounds_half_up():
    # scale 2: positions 2i + 0.5, fraction 1/2, weights (1024, 1024) in both directions. A row value is
    # 1024 (a + b); >> 4 gives 64 (a + b); 1024 * 64 (a + b) >> 16 = a + b exactly, so
    # out = (a + b + c + d + 2) >> 2: the 2 x 2 mean rounded half up (OpenCV's INTER_AREA fast path gives the same).
    image = np.array([[0, 1, 2, 3], [1, 0, 2, 3], [1, 2, 255, 255], [1, 2, 255, 255]], dtype=np.uint8)
    # top-left: sum 2 -> (2 + 2) >> 2 = 1 (mean 0.5; round-half-even gives 0)
    # top-right: sum 10 -> 12 >> 2 = 3 (mean 2.5; round-half-even gives 2)
    # bottom-left: sum 6 -> 8 >> 2 = 2; bottom-right: sum 1020 -> 1022 >> 2 = 255
    assert opencv_bilinear_resize(image, 2, 2).tolist() == [[1, 3], [2, 255]]


def test_3x3_to_2x2_three_channels_truncates_in_the_vertical_pass():
    # scale 1 / (2 / 3) = 1.5: positions 0.25 and 1.75, so taps (0, 1) with weights (1536, 512) and taps (1, 2) with
    # weights (512, 1536), in both directions.
    columns = np.array([[0, 0, 10]] * 3, dtype=np.uint8)  # channel 0: varies along x
    image = np.stack([columns, columns.T, np.full((3, 3), 255, dtype=np.uint8)], axis=-1)
    out = opencv_bilinear_resize(image, 2, 2)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    # Channel 0, output column 1: row = 0 * 512 + 10 * 1536 = 15360 in every source row; 15360 >> 4 = 960;
    # (1536 * 960) >> 16 = 22 (22.5) and (512 * 960) >> 16 = 7 (7.5): (22 + 7 + 2) >> 2 = 7, though the exact value
    # is 7.5 (a rounded float bilinear gives 8). Output column 0 reads zeros only.
    assert out[..., 0].tolist() == [[0, 7], [0, 7]]
    # Channel 1 (channel 0 transposed), output row 1: source rows 1 and 2 hold 0 and 10 * 2048 = 20480 (both
    # horizontal weights hit equal pixels); 20480 >> 4 = 1280; (1536 * 1280) >> 16 = 30 exactly: (0 + 30 + 2) >> 2 = 8.
    # The transpose does not commute with the resize: the truncation happens in the vertical pass only.
    assert out[..., 1].tolist() == [[0, 0], [8, 8]]
    # 255 everywhere: 255 * 2048 = 522240; >> 4 = 32640; (1536 * 32640) >> 16 = 765, (512 * 32640) >> 16 = 255;
    # (765 + 255 + 2) >> 2 = 255: no overflow, no loss at the top of the range.
    assert (out[..., 2] == 255).all()


def test_upscaling_2x2_to_3x3_keeps_the_fraction_at_the_top_and_bottom_edges():
    # scale 1 / (3 / 2) = 2 / 3: positions -1/6, 1/2, 7/6.
    # Horizontal: -1/6 is left of pixel 0, so tap 0 with weights (2048, 0); 1/2 -> taps (0, 1), (1024, 1024);
    # 7/6 is beyond the last pixel, so tap 1 with (2048, 0).
    # Vertical: the fraction is kept and the rows clamped: -1/6 -> rows (0, 0) with weights round(2048 / 6) = 341 and
    # round(2048 * 5 / 6) = 1707; 1/2 -> rows (0, 1), (1024, 1024); 7/6 -> rows (1, 1), (1707, 341).
    image = np.array([[1, 2], [5, 9]], dtype=np.uint8)
    # Rows after the horizontal pass, >> 4: source row 0: [2048, 3072, 4096] -> [128, 192, 256];
    # source row 1: [10240, 14336, 18432] -> [640, 896, 1152].
    # Output (0, 1): (341 * 192) >> 16 = 0 (0.999) and (1707 * 192) >> 16 = 5 (5.001): (0 + 5 + 2) >> 2 = 1, where
    # the exact value is 1.5 (a rounded float bilinear, or weights reset to (2048, 0) at the edge, give 2).
    # Output (1, 2): 256 / 64 + 1152 / 64 = 4 + 18 = 22: (22 + 2) >> 2 = 6. Output (1, 1): 3 + 14 = 17 -> 4.
    # Output (2, 1): (1707 * 896) >> 16 = 23 and (341 * 896) >> 16 = 4: (27 + 2) >> 2 = 7.
    assert opencv_bilinear_resize(image, 3, 3).tolist() == [[1, 1, 2], [3, 4, 6], [5, 7, 9]]


def test_same_size_is_a_copy_and_shapes_follow_the_input():
    image = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    same = opencv_bilinear_resize(image, 5, 7)
    assert np.array_equal(same, image) and same is not image
    gray = image[..., 0]
    assert opencv_bilinear_resize(gray, 3, 4).shape == (3, 4)
    # One channel as (H, W, 1) gives the same values as (H, W).
    assert np.array_equal(opencv_bilinear_resize(gray[..., None], 3, 4)[..., 0], opencv_bilinear_resize(gray, 3, 4))


@pytest.mark.parametrize(
    ("image", "height", "width", "message"),
    [
        (np.zeros((4, 4), dtype=np.float32), 2, 2, "uint8"),
        (np.zeros((2, 4, 4, 3), dtype=np.uint8), 2, 2, "uint8"),
        (np.zeros((4, 4), dtype=np.uint8), 0, 2, "height"),
        (np.zeros((4, 4), dtype=np.uint8), 2, 2.5, "width"),
        (np.zeros((0, 4), dtype=np.uint8), 2, 2, "no pixels"),
    ],
)
def test_bad_inputs_raise(image, height, width, message):
    with pytest.raises(ValueError, match=message):
        opencv_bilinear_resize(image, height, width)


def test_equals_cv2_resize_inter_linear():
    """Against OpenCV itself (opencv-python-headless, in the dev extra): every size pair below, up and down."""
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    cases = [(rng.integers(1, 41, size=4).tolist(), channels) for channels in (1, 3, 4) for _ in range(100)]
    cases += [([5, 7, 10, 14], 3), ([10, 14, 5, 7], 3), ([427, 640, 256, 384], 3), ([300, 451, 256, 385], 1)]
    for (height, width, new_height, new_width), channels in cases:
        image = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
        expected = cv2.resize(image, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
        out = opencv_bilinear_resize(image, new_height, new_width)
        assert np.array_equal(out, expected.reshape(out.shape)), (height, width, new_height, new_width, channels)
