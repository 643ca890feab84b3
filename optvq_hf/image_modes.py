"""The one conversion from any image PIL can open (or a numpy array) to values in [0, 1].

Every data path (the image processor, the training transforms, the evaluation script) goes through `to_unit_array`,
so a 16-bit or float image means the same thing everywhere. Rules:

- 8-bit modes (`1`, `L`, `P`, `RGB`, `CMYK`, `YCbCr`, `LAB`, `HSV`): PIL's own conversion to RGB / L, divided by 255.
  A 48-bit RGB PNG opens in PIL as `RGB` (8 bits per channel) and so follows this rule.
- 16-bit modes (`I;16`, `I;16B`, `I;16L`, `I;16N`) and numpy `uint16`: divided by 65535.
- `I` (32-bit signed): values must lie in [0, 65535] (PIL opens 16-bit PNGs as `I`), divided by 65535; other values
  raise a ValueError naming the mode and the range found. Numpy arrays of other integer dtypes (int32, int64, ...)
  are refused: their range is ambiguous (0..255 and 0..65535 are both common), so convert them to uint8 or uint16.
- `F` (32-bit float) and numpy float arrays: values must be finite and in [0, 1] (taken as they are); otherwise a
  ValueError naming the mode and the range found (rescale the image to [0, 1] first).
- numpy `uint8`: divided by 255; numpy `bool`: 0 or 1.
- Alpha (`LA`, `La`, `PA`, `RGBA`, `RGBa`, a 2- or 4-channel array): composited on white,
  `value = colour * alpha + (1 - alpha)`, so transparent pixels become white.
- Channels: 3 (RGB; one grey channel is repeated) or 1 (grey by ITU-R 601 luma, `0.299 R + 0.587 G + 0.114 B`, the
  weights PIL's `convert("L")` uses).
"""

from __future__ import annotations

import numpy as np
import PIL.Image

__all__ = ["to_unit_array", "to_pil_image"]

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;16BS", "I;16LS")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa")
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float64)


def _checked_range(values: np.ndarray, low: float, high: float, what: str, fix: str) -> None:
    if values.size == 0:
        return
    finite = np.isfinite(values).all()
    vmin, vmax = float(np.min(values)), float(np.max(values))
    if not finite or vmin < low or vmax > high:
        raise ValueError(
            f"{what} must have finite values in [{low:g}, {high:g}], found range [{vmin:g}, {vmax:g}]; {fix}"
        )


def _array_to_unit(array: np.ndarray, what: str) -> np.ndarray:
    """Integer or float array (any channel layout) -> float64 in [0, 1] by the module's rules."""
    if array.dtype == np.bool_:
        return array.astype(np.float64)
    if array.dtype == np.uint8:
        return array.astype(np.float64) / 255.0
    if array.dtype == np.uint16 or array.dtype == np.dtype(">u2"):
        return array.astype(np.float64) / 65535.0
    if np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{what}: integer arrays other than uint8 (0..255) and uint16 (0..65535) are ambiguous; convert the image "
            f"to one of those dtypes (or to float in [0, 1]) first"
        )
    if np.issubdtype(array.dtype, np.floating):
        values = array.astype(np.float64)
        _checked_range(values, 0.0, 1.0, what, "rescale the image to [0, 1] first")
        return values
    raise TypeError(f"{what}: unsupported array dtype {array.dtype}; expected uint8, uint16, integer, float or bool")


def _pil_to_unit(image: PIL.Image.Image) -> np.ndarray:
    """PIL image -> float64 (H, W, C) in [0, 1] with C in {1, 2, 3, 4} (grey, grey+alpha, RGB, RGBA)."""
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        array = np.asarray(image).astype(np.float64)
        if array.min(initial=0) < 0:  # the signed 16-bit variants
            raise ValueError(f"image mode {mode!r} has negative values; expected unsigned 16-bit values")
        return (array / 65535.0)[..., None]
    if mode == "I":
        array = np.asarray(image, dtype=np.int64)
        _checked_range(array, 0, 65535, "image of mode 'I'", "32-bit integer images are read as 16-bit values")
        return (array.astype(np.float64) / 65535.0)[..., None]
    if mode == "F":
        return _array_to_unit(np.asarray(image, dtype=np.float32), "image of mode 'F'")[..., None]
    if mode in _ALPHA_MODES:
        target = "LA" if mode in ("LA", "La") else "RGBA"
        return np.asarray(image.convert(target), dtype=np.float64) / 255.0
    if mode == "PA":
        return np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0
    if mode == "P" and "transparency" in image.info:
        return np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0
    if mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.float64)[..., None] / 255.0
    try:
        rgb = image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"image mode {mode!r} cannot be converted to RGB: {error}") from error
    return np.asarray(rgb, dtype=np.float64) / 255.0


def to_unit_array(image: PIL.Image.Image | np.ndarray, num_channels: int = 3) -> np.ndarray:
    """Any PIL image or (H, W[, C]) numpy array -> float32 (H, W, num_channels) in [0, 1] (rules: module docstring)."""
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels!r}")
    if isinstance(image, PIL.Image.Image):
        values = _pil_to_unit(image)
    elif isinstance(image, np.ndarray):
        if image.ndim == 2:
            image = image[..., None]
        if image.ndim != 3 or image.shape[-1] not in (1, 2, 3, 4):
            raise ValueError(
                f"image array must have shape (H, W) or (H, W, C) with C in 1..4 (channels last), got {image.shape}"
            )
        values = _array_to_unit(image, f"image array of dtype {image.dtype}")
    else:
        raise TypeError(f"image must be a PIL image or a numpy array, got {type(image).__name__}")
    channels = values.shape[-1]
    if channels in (2, 4):  # composite on white
        alpha = values[..., -1:]
        values = values[..., :-1] * alpha + (1.0 - alpha)
    if num_channels == 1 and values.shape[-1] == 3:
        values = (values @ _LUMA)[..., None]
    elif num_channels == 3 and values.shape[-1] == 1:
        values = np.repeat(values, 3, axis=-1)
    return np.clip(values, 0.0, 1.0).astype(np.float32)


def to_pil_image(image: PIL.Image.Image | np.ndarray, num_channels: int = 3) -> PIL.Image.Image:
    """`to_unit_array` rounded to 8 bits as a PIL `RGB` (3 channels) or `L` (1) image, for PIL resizing and cropping.

    8-bit RGB / L images are returned unchanged (no rounding round trip)."""
    mode = "RGB" if num_channels == 3 else "L"
    if isinstance(image, PIL.Image.Image) and image.mode == mode:
        return image
    array = np.rint(to_unit_array(image, num_channels) * 255.0).astype(np.uint8)
    return PIL.Image.fromarray(array[..., 0] if num_channels == 1 else array)
