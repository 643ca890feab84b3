"""OpenCV's `cv2.resize(..., interpolation=cv2.INTER_LINEAR)` for uint8 images, in numpy, bit for bit.

The original OptVQ evaluates with albumentations `SmallestMaxSize` (OpenCV INTER_LINEAR) on uint8 arrays; this is
that resize without an OpenCV dependency, for `OptVQImageProcessor(resample="opencv_bilinear")`. It follows OpenCV's
generic separable path for 8-bit images (`imgproc/src/resize.cpp`), integer arithmetic included:

- Source position of output pixel i: `(i + 0.5) * scale - 0.5` in double, `scale = 1 / (target / source)`, then
  rounded to float32; its floor is the first tap, the float32 remainder `f` the fraction.
- Weights `(1 - f, f)` in 11-bit fixed point (INTER_RESIZE_COEF_BITS = 11, scale 2048), each rounded half to even.
- Horizontal pass: `row = p0 * w0 + p1 * w1` in int32. A position left of the first pixel or at / beyond the last one
  takes that edge pixel with weight 2048 (fraction reset to 0).
- Vertical pass: unlike the horizontal one, the fraction is kept at the top and bottom edges and both row indices
  are clamped to the image (both taps then read the same edge row), as OpenCV does. The two rows are combined as
  OpenCV's SIMD kernel and its scalar tail both do for uint8:
  `(((b0 * (row0 >> 4)) >> 16) + ((b1 * (row1 >> 4)) >> 16) + 2) >> 2`, which is not exactly
  `round((b0 * row0 + b1 * row1) / 2 ** 22)`.
- Same size: a copy. Exact 2x downscaling in both directions: OpenCV switches to its INTER_AREA fast path, whose
  `(a + b + c + d + 2) >> 2` equals the bilinear formula above at fraction 1/2, so no special case is needed.

Checked equal to `cv2.resize` (opencv-python-headless 4.10, 4.14 and 5.0 on x86-64) on random and saturated images
of 1, 3 and 4 channels, sizes from 1 to 400 pixels, downscaling and upscaling, exact halving and doubling, and on
the scikit-image photos of `benchmarks/resize.py`; tests/test_opencv_resize.py repeats a part of it when cv2 is
installed. Builds of OpenCV whose vendor HAL replaces `resize` (some ARM builds) may round differently.
"""

from __future__ import annotations

import numpy as np

__all__ = ["opencv_bilinear_resize"]

_COEF_BITS = 11  # OpenCV's INTER_RESIZE_COEF_BITS
_COEF_SCALE = 1 << _COEF_BITS


def _positions(source: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    """First tap (int64, unclamped) and float32 fraction of each output pixel along one axis."""
    scale = 1.0 / (target / source)  # OpenCV stores the inverse scale, then inverts it back
    position = ((np.arange(target, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    first = np.floor(position).astype(np.int64)
    return first, position - first.astype(np.float32)


def _fixed_weights(fraction: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`saturate_cast<short>((1 - f) * 2048)` and `saturate_cast<short>(f * 2048)`: float32, rounded half to even."""
    scale = np.float32(_COEF_SCALE)
    weight0 = np.rint((np.float32(1) - fraction) * scale).astype(np.int32)
    weight1 = np.rint(fraction * scale).astype(np.int32)
    return weight0, weight1


def _horizontal_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    first, fraction = _positions(source, target)
    fraction[first < 0] = 0
    first[first < 0] = 0
    beyond = first >= source - 1
    fraction[beyond] = 0
    first[beyond] = source - 1
    weight0, weight1 = _fixed_weights(fraction)
    return first, np.minimum(first + 1, source - 1), weight0, weight1


def _vertical_taps(source: int, target: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    first, fraction = _positions(source, target)
    weight0, weight1 = _fixed_weights(fraction)
    return np.clip(first, 0, source - 1), np.clip(first + 1, 0, source - 1), weight0, weight1


def opencv_bilinear_resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """
    `cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)` for a uint8 image: (H, W) or (H, W, C), any
    number of channels (each is resized on its own). Returns uint8 of shape (height, width) or (height, width, C).
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        kind = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(
            f"opencv_bilinear_resize takes a uint8 (H, W) or (H, W, C) array, got a {kind}; convert the image to "
            f"uint8 first (optvq_hf.image_modes.to_pil_image does, for any PIL mode or dtype)"
        )
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if 0 in image.shape:
        raise ValueError(f"cannot resize an image with no pixels (shape {image.shape})")
    if image.shape[:2] == (height, width):
        return image.copy()

    pixels = image[..., None] if image.ndim == 2 else image
    x0, x1, a0, a1 = _horizontal_taps(pixels.shape[1], int(width))
    y0, y1, b0, b1 = _vertical_taps(pixels.shape[0], int(height))
    # int32 suffices: a row value is at most 255 * 2048, and b * (row >> 4) at most 2048 * 32640.
    pixels = pixels.astype(np.int32)
    rows = pixels[:, x0] * a0[None, :, None] + pixels[:, x1] * a1[None, :, None]  # (H, width, C)
    b0, b1 = b0[:, None, None], b1[:, None, None]
    out = (((b0 * (rows[y0] >> 4)) >> 16) + ((b1 * (rows[y1] >> 4)) >> 16) + 2) >> 2
    out = np.clip(out, 0, 255).astype(np.uint8)
    return out[..., 0] if image.ndim == 2 else out
