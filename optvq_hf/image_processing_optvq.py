"""Image processor of OptVQ: images -> `pixel_values` in [-1, 1], and model outputs -> images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_backends import PilBackend
from transformers.image_processing_utils import BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict, infer_channel_dimension_format
from transformers.processing_utils import ImagesKwargs

from .image_modes import to_pil_image
from .opencv_resize import opencv_bilinear_resize

# The original's evaluation resize (albumentations SmallestMaxSize: OpenCV INTER_LINEAR on uint8), not a PIL filter.
OPENCV_BILINEAR = "opencv_bilinear"

_RESAMPLE = {
    "nearest": PILImageResampling.NEAREST,
    "bilinear": PILImageResampling.BILINEAR,
    "bicubic": PILImageResampling.BICUBIC,
    "lanczos": PILImageResampling.LANCZOS,
    "box": PILImageResampling.BOX,
    "hamming": PILImageResampling.HAMMING,
}


def _resample(value: Any) -> Any:
    """PIL filters by name ("bicubic", as old configs and scripts write them) become `PILImageResampling`;
    "opencv_bilinear" stays a string (it is not a PIL filter)."""
    if isinstance(value, str) and value.lower() == OPENCV_BILINEAR:
        return OPENCV_BILINEAR
    if isinstance(value, str) and value.lower() in _RESAMPLE:
        return _RESAMPLE[value.lower()]
    if isinstance(value, str) or isinstance(value, bool) or not isinstance(value, int):
        value_ok = False
    else:
        value_ok = value in set(PILImageResampling)
    if not value_ok:
        raise ValueError(
            f"resample must be one of {sorted(_RESAMPLE) + [OPENCV_BILINEAR]} or a PILImageResampling, got {value!r}"
        )
    return value


def _validate_resample(value: Any) -> None:
    """Call-time validator of the `resample` kwarg (transformers' own accepts only PIL filters)."""
    if value is not None:
        _resample(value)


class OptVQImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    num_channels (`int`, *optional*, defaults to 3):
        3 (images converted to RGB) or 1 (converted to grayscale), the model's `in_channels`.
    resample (`PILImageResampling`, `int` or `str`, *optional*):
        a PIL filter, by value or by name, or "opencv_bilinear" (see `OptVQImageProcessor`).
    """

    num_channels: int
    resample: Annotated[PILImageResampling | int | str | None, _validate_resample]


class OptVQImageProcessor(PilBackend):
    r"""
    Prepares images for [`OptVQModel`]: resize so that the shorter side equals `size["shortest_edge"]`, center-crop to
    `crop_size`, scale to [-1, 1] (`rescale_factor` 1/127.5, then mean = std = 1), return `pixel_values`
    (B, C, H, W) float32. `postprocess` maps model outputs back to PIL images or uint8 arrays.

    Every input (PIL image of any mode, numpy array or torch tensor of any supported dtype, channels-first or -last,
    see `input_data_format`) first goes through `optvq_hf.image_modes.to_pil_image`, so 16-bit and float images are
    scaled by their range into 8 bits, never clipped, before the standard pipeline.

    The shortest-edge resize makes the shorter side `size["shortest_edge"]` and the longer one
    `round(longer * shortest_edge / shorter)` (Python's round, half to even; transformers would truncate), the rule
    of albumentations' `SmallestMaxSize`; the center crop takes offsets `(H - h) // 2` and `(W - w) // 2`, as
    albumentations' `CenterCrop`. So `resample="opencv_bilinear"` with the default 256 reproduces the original OptVQ
    evaluation protocol, albumentations `SmallestMaxSize(256)` (interpolation `cv2.INTER_LINEAR`, its default) then
    `CenterCrop(256, 256)` on the uint8 image, then x / 255 normalised with mean = std = 0.5: the same uint8 crop,
    bit for bit, and the same float32 values. The default, PIL bicubic, low-pass filters when downscaling; OpenCV's
    INTER_LINEAR reads 2 x 2 pixels whatever the scale and aliases more (`benchmarks/resize.py` measures the
    difference). Use "opencv_bilinear" to compare with numbers measured by the original code.

    Args:
        resolution (`int`, *optional*): shorthand for `size={"shortest_edge": resolution}` and
            `crop_size={"height": resolution, "width": resolution}`; explicit `size` / `crop_size` take precedence.
        num_channels (`int`, *optional*, defaults to 3): 3 (RGB) or 1 (grayscale).
        resample (`PILImageResampling` or `str`, *optional*, defaults to bicubic): filter for resizing; PIL filters
            by name ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming") are accepted, and
            `"opencv_bilinear"`: `cv2.resize(..., interpolation=cv2.INTER_LINEAR)` reproduced bit for bit in numpy
            (`optvq_hf.opencv_resize`, no OpenCV needed), for `size={"shortest_edge": n}` or
            `size={"height": h, "width": w}`. Saved as this string in preprocessor_config.json.
        **kwargs: every standard `ImagesKwargs` (`size`, `crop_size`, `do_resize`, `do_center_crop`, `do_rescale`,
            `rescale_factor`, `do_normalize`, `image_mean`, `image_std`, `do_convert_rgb`, `return_tensors`, ...).
    """

    valid_kwargs = OptVQImageProcessorKwargs
    model_input_names = ["pixel_values"]

    resample = PILImageResampling.BICUBIC
    # Scalars so that the same defaults serve 1- and 3-channel images: (x / 127.5 - 1) / 1.
    image_mean = 1.0
    image_std = 1.0
    size = {"shortest_edge": 256}
    default_to_square = False
    crop_size = {"height": 256, "width": 256}
    do_resize = True
    do_center_crop = True
    do_rescale = True
    rescale_factor = 1 / 127.5
    do_normalize = True
    do_convert_rgb = True
    return_tensors = "pt"
    num_channels = 3

    def __init__(
        self,
        resolution: int | None = None,
        num_channels: int | None = None,
        resample: Any = None,
        **kwargs,
    ):
        if resolution is not None:
            _check_resolution(resolution)
            kwargs.setdefault("size", {"shortest_edge": resolution})
            kwargs.setdefault("crop_size", {"height": resolution, "width": resolution})
        if num_channels is not None:
            kwargs["num_channels"] = num_channels
        if resample is not None:
            kwargs["resample"] = _resample(resample)
        _check_num_channels(kwargs.get("num_channels", type(self).num_channels))
        super().__init__(**kwargs)

    @property
    def resolution(self) -> int:
        """Side of the square output: the crop (or, without center crop, the resized shorter side)."""
        if self.do_center_crop and self.crop_size is not None and self.crop_size.height == self.crop_size.width:
            return self.crop_size.height
        return self.size.shortest_edge

    @resolution.setter
    def resolution(self, value: int) -> None:
        _check_resolution(value)
        self.size = SizeDict(shortest_edge=value)
        self.crop_size = SizeDict(height=value, width=value)

    @classmethod
    def from_model_config(cls, config, **kwargs) -> OptVQImageProcessor:
        """The processor matching an `OptVQConfig` (resolution and channels)."""
        return cls(resolution=config.resolution, num_channels=config.in_channels, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        # Kept for readers of preprocessor_config.json written by earlier versions (size/crop_size are authoritative).
        output["resolution"] = self.resolution
        return output

    # -- standard pipeline, with OptVQ's input conversion and resize rounding ---------------------------------------
    def preprocess(self, images: Any, *args, **kwargs) -> BatchFeature:
        """Convert one image or a batch / list of images to `pixel_values` in [-1, 1]."""
        if isinstance(images, (list, tuple)) and len(images) == 0:
            raise ValueError("no images to preprocess")
        if "resolution" in kwargs:  # call-time shorthand, as in the constructor
            resolution = kwargs.pop("resolution")
            _check_resolution(resolution)
            kwargs.setdefault("size", {"shortest_edge": resolution})
            kwargs.setdefault("crop_size", {"height": resolution, "width": resolution})
        if kwargs.get("resample") is not None:
            kwargs["resample"] = _resample(kwargs["resample"])
        if kwargs.get("num_channels") is not None:
            _check_num_channels(kwargs["num_channels"])
        return super().preprocess(images, *args, **kwargs)

    def pixel_array(self, images: Sequence[Any], resolution: int | None = None) -> np.ndarray:
        """(B, C, R, R) float32 `pixel_values` of a list of images with this processor's settings (at `resolution`
        if given): `preprocess(images, resolution=resolution, return_tensors=None)` stacked, value for value, with
        the settings resolved and validated once per call instead of once per image, and the per-pixel arithmetic
        done once for the batch. For data loaders: on small images the per-call argument handling of `preprocess`
        costs more than the resize itself."""
        if len(images) == 0:
            raise ValueError("no images to preprocess")
        kwargs = {name: getattr(self, name, None) for name in self._valid_kwargs_names}
        if resolution is not None:
            _check_resolution(resolution)
            kwargs.update(size={"shortest_edge": resolution}, crop_size={"height": resolution, "width": resolution})
        kwargs = self._standardize_kwargs(**kwargs)
        self._validate_preprocess_kwargs(**kwargs)
        kwargs["return_tensors"] = None
        size, resample = kwargs["size"], _resample(kwargs["resample"])
        if kwargs["do_pad"] or not (kwargs["do_rescale"] and kwargs["do_normalize"]):
            arrays = [self.process_image(image, **kwargs) for image in images]
            return np.stack(self._preprocess(arrays, **kwargs)["pixel_values"])
        # The same steps with less per-image work: a PIL filter resizes the converted PIL image itself (not a copy
        # made back from its array), the center crop is a slice of the (H, W, C) array, and the rescale and
        # normalisation are one lookup per pixel in a table of the 256 values of each channel computed with
        # transformers' dtypes (float64 product, float32 result, float32 mean and std): identical values.
        direct_resize = kwargs["do_resize"] and resample != OPENCV_BILINEAR and _is_shortest_edge(size)
        crop = kwargs["crop_size"] if kwargs["do_center_crop"] else None
        crops = []
        for image in images:
            pil = self._model_pil_image(
                image, kwargs["do_convert_rgb"], kwargs["input_data_format"], kwargs["num_channels"]
            )
            if direct_resize:
                pil = pil.resize(_shortest_edge_size(pil.height, pil.width, size.shortest_edge)[::-1], resample)
            array = np.asarray(pil)
            array = array[..., None] if array.ndim == 2 else array
            if kwargs["do_resize"] and not direct_resize:
                array = self.resize(array.transpose(2, 0, 1), size, resample=resample).transpose(1, 2, 0)
            if crop is not None:
                top, left = _center_crop_corner(*array.shape[:2], crop)
                array = array[top : top + crop.height, left : left + crop.width]
            crops.append(array)
        batch = np.stack(crops)  # (B, H, W, C) uint8
        channels = batch.shape[-1]
        mean, std = (
            np.asarray(value if isinstance(value, Sequence) else [value] * channels, dtype=np.float32)[:, None]
            for value in (kwargs["image_mean"], kwargs["image_std"])
        )
        if mean.shape[0] != channels or std.shape[0] != channels:
            raise ValueError(f"image_mean and image_std must have {channels} values (or be scalars)")
        levels = (np.arange(256, dtype=np.float64) * kwargs["rescale_factor"]).astype(np.float32)
        table = (levels[None, :] - mean) / std  # (C, 256)
        out = np.empty((batch.shape[0], channels, *batch.shape[1:3]), dtype=np.float32)
        for channel in range(channels):
            np.take(table[channel], batch[..., channel], out=out[:, channel], mode="clip")
        return out

    def _prepare_images_structure(self, images: Any, expected_ndims: int = 3) -> list[Any]:
        """A 4D array / tensor is a batch; a 2D or 3D one, a PIL image, one image; a list, one image per item
        (grayscale (H, W) arrays included, which transformers' flattening rejects). URLs and paths: standard."""
        if isinstance(images, (np.ndarray, torch.Tensor)):
            if images.ndim == 4:
                return list(images)
            if images.ndim in (2, 3):
                return [images]
            raise ValueError(f"an image batch must be 2D, 3D or 4D (B, ...), got shape {tuple(images.shape)}")
        if isinstance(images, PIL.Image.Image):
            return [images]
        if isinstance(images, (list, tuple)) and not any(isinstance(image, (str, list, tuple)) for image in images):
            return list(images)
        if not isinstance(images, (str, list, tuple)):
            raise ValueError(
                f"unsupported image type {type(images).__name__}: use PIL images, numpy arrays, torch tensors, "
                f"paths or URLs"
            )
        return super()._prepare_images_structure(images, expected_ndims=expected_ndims)

    def process_image(
        self,
        image: Any,
        do_convert_rgb: bool | None = None,
        input_data_format: str | ChannelDimension | None = None,
        num_channels: int | None = None,
        **kwargs,
    ) -> np.ndarray:
        """One input -> uint8 (C, H, W) in the model's channel mode, through `image_modes.to_pil_image`."""
        array = np.asarray(self._model_pil_image(image, do_convert_rgb, input_data_format, num_channels))
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)

    def _model_pil_image(
        self,
        image: Any,
        do_convert_rgb: bool | None,
        input_data_format: str | ChannelDimension | None,
        num_channels: int | None = None,
    ) -> PIL.Image.Image:
        """One input -> an 8-bit PIL image in the model's channel mode (L or RGB), checked."""
        num_channels = self.num_channels if num_channels is None else num_channels
        if isinstance(image, PIL.Image.Image):
            source_channels = len(image.getbands())
        else:
            if isinstance(image, torch.Tensor):
                image = image.detach().cpu()
                image = (image.float() if image.dtype == torch.bfloat16 else image).numpy()
            if not isinstance(image, np.ndarray):
                raise ValueError(
                    f"unsupported image type {type(image).__name__}: use PIL images, numpy arrays or torch tensors"
                )
            if image.ndim == 3:
                try:
                    data_format = (
                        infer_channel_dimension_format(image, num_channels=(1, 3, 4))
                        if input_data_format is None
                        else ChannelDimension(input_data_format)
                    )
                except ValueError as error:
                    raise ValueError(
                        f"an image must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4, got shape {image.shape}"
                    ) from error
                if data_format == ChannelDimension.FIRST:
                    image = np.moveaxis(image, 0, -1)
                if image.shape[-1] == 1:
                    image = image[..., 0]
            if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
                raise ValueError(
                    f"an image must be (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4, got shape {image.shape}"
                )
            source_channels = 1 if image.ndim == 2 else image.shape[-1]
        if not do_convert_rgb and source_channels != num_channels:
            raise ValueError(
                f"do_convert_rgb=False but the image has {source_channels} channels and the processor expects "
                f"num_channels={num_channels}; pass do_convert_rgb=True to convert it"
            )
        pil = to_pil_image(image, num_channels)  # dtype and value-range rules: optvq_hf.image_modes
        if min(pil.size) == 0:
            raise ValueError(f"image of size {pil.size[0]}x{pil.size[1]} has no pixels")
        return pil

    def resize(self, image: np.ndarray, size: SizeDict, resample: Any = None, **kwargs) -> np.ndarray:
        """Shortest-edge resize with the long side rounded (transformers truncates it); "opencv_bilinear" for
        shortest-edge and (height, width) sizes; other sizes: standard."""
        resample = _resample(self.resample if resample is None else resample)
        channels, height, width = image.shape
        if _is_shortest_edge(size) and image.dtype == np.uint8:
            new_height, new_width = _shortest_edge_size(height, width, size.shortest_edge)
        elif resample == OPENCV_BILINEAR and size.height and size.width and not size.shortest_edge:
            new_height, new_width = size.height, size.width
        elif resample == OPENCV_BILINEAR:
            raise ValueError(
                f"resample='opencv_bilinear' needs size={{'shortest_edge': n}} or {{'height': h, 'width': w}} and "
                f"a uint8 image, got {size} and a {image.dtype} image"
            )
        else:
            return super().resize(image, size, resample=resample, **kwargs)
        pixels = image[0] if channels == 1 else image.transpose(1, 2, 0)  # (H, W) or (H, W, C)
        if resample == OPENCV_BILINEAR:
            out = opencv_bilinear_resize(pixels, new_height, new_width)
        else:
            out = np.asarray(PIL.Image.fromarray(pixels).resize((new_width, new_height), resample=resample))
        return out[None] if out.ndim == 2 else out.transpose(2, 0, 1)

    def center_crop(self, image: np.ndarray, size: SizeDict, **kwargs) -> np.ndarray:
        """Standard center crop, but an image smaller than the crop is an error, not silently zero-padded."""
        if size.height is not None and size.width is not None:
            _center_crop_corner(*image.shape[-2:], size)  # the check
        return super().center_crop(image, size, **kwargs)

    # -- model outputs -> images --------------------------------------------------------------------------------------
    def postprocess(
        self, pixel_values: torch.Tensor | np.ndarray, output_type: str = "pil"
    ) -> list[PIL.Image.Image] | np.ndarray:
        """
        Model outputs in [-1, 1] (B, C, H, W) -> a list of PIL images (`output_type="pil"`) or a uint8 array
        (B, H, W, C) (`output_type="np"`). Values outside [-1, 1] are clipped.
        """
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        if isinstance(pixel_values, torch.Tensor):
            pixel_values = pixel_values.detach().float().cpu().numpy()
        if pixel_values.ndim == 3:
            pixel_values = pixel_values[None]
        if pixel_values.ndim != 4 or pixel_values.shape[1] not in (1, 3):
            raise ValueError(f"expected (B, C, H, W) with 1 or 3 channels, got shape {pixel_values.shape}")
        images = np.round((np.clip(pixel_values, -1.0, 1.0) + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
        if output_type == "np":
            return images
        return [PIL.Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in images]


def _is_shortest_edge(size: SizeDict) -> bool:
    return bool(size.shortest_edge) and not size.longest_edge


def _shortest_edge_size(height: int, width: int, target: int) -> tuple[int, int]:
    """(height, width) with the shorter side `target` and the longer one rounded (transformers truncates it)."""
    scale = target / min(height, width)
    return max(target, round(height * scale)), max(target, round(width * scale))


def _center_crop_corner(height: int, width: int, crop: SizeDict) -> tuple[int, int]:
    """(top, left) of transformers' center crop of an image of this size (which rounds the offsets down); an image
    smaller than the crop is an error."""
    if height < crop.height or width < crop.width:
        raise ValueError(
            f"image of size {width}x{height} is smaller than the crop {crop.width}x{crop.height}; "
            f"enable do_resize or lower crop_size"
        )
    return (height - crop.height) // 2, (width - crop.width) // 2


def _check_resolution(resolution: Any) -> None:
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")


def _check_num_channels(num_channels: Any) -> None:
    if num_channels not in (1, 3):
        raise ValueError(f"num_channels must be 1 or 3, got {num_channels!r}")


__all__ = ["OptVQImageProcessor"]
