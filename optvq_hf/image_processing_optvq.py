"""Image processor of OptVQ: images -> `pixel_values` in [-1, 1], and model outputs -> images."""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature

from .image_modes import to_pil_image

_RESAMPLE = {
    "nearest": PIL.Image.Resampling.NEAREST,
    "bilinear": PIL.Image.Resampling.BILINEAR,
    "bicubic": PIL.Image.Resampling.BICUBIC,
    "lanczos": PIL.Image.Resampling.LANCZOS,
    "box": PIL.Image.Resampling.BOX,
}


class OptVQImageProcessor(BaseImageProcessor):
    r"""
    Prepares images for [`OptVQModel`]: resize so that the shorter side equals `resolution`, center-crop to
    `resolution` x `resolution`, scale to [-1, 1], return `pixel_values` (B, C, H, W) float32. `postprocess` maps model
    outputs back to PIL images or uint8 arrays.

    Accepted inputs: a PIL image, a numpy array (H, W, C) or (H, W) (uint8 in [0, 255] or float in [0, 1]), a torch
    tensor (C, H, W) (uint8, or float in [0, 1]), or a list of those; a torch tensor (B, C, H, W) is a batch.

    Args:
        resolution (`int`, *optional*, defaults to 256): side of the square output.
        do_resize (`bool`, *optional*, defaults to `True`): resize the shorter side to `resolution`.
        do_center_crop (`bool`, *optional*, defaults to `True`): center-crop to `resolution` x `resolution`.
        resample (`str`, *optional*, defaults to `"bicubic"`): PIL filter for resizing (nearest, bilinear, bicubic,
            lanczos, box).
        num_channels (`int`, *optional*, defaults to 3): 3 (images converted to RGB) or 1 (converted to grayscale).
    """

    model_input_names = ["pixel_values"]

    def __init__(
        self,
        resolution: int = 256,
        do_resize: bool = True,
        do_center_crop: bool = True,
        resample: str = "bicubic",
        num_channels: int = 3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {sorted(_RESAMPLE)}, got {resample!r}")
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 or 3, got {num_channels!r}")
        self.resolution = resolution
        self.do_resize = do_resize
        self.do_center_crop = do_center_crop
        self.resample = resample
        self.num_channels = num_channels

    @classmethod
    def from_model_config(cls, config, **kwargs) -> OptVQImageProcessor:
        """The processor matching an `OptVQConfig` (resolution and channels)."""
        return cls(resolution=config.resolution, num_channels=config.in_channels, **kwargs)

    # -- input conversion ---------------------------------------------------------------------------------------------
    def _to_pil(self, image: Any) -> PIL.Image.Image:
        if isinstance(image, PIL.Image.Image):
            return image
        if isinstance(image, torch.Tensor):
            if image.ndim != 3:
                raise ValueError(f"a tensor image must be (C, H, W), got shape {tuple(image.shape)}")
            image = image.detach().cpu().permute(1, 2, 0).numpy()
        if not isinstance(image, np.ndarray):
            raise ValueError(f"unsupported image type {type(image).__name__}: use PIL images, numpy arrays or tensors")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
            raise ValueError(
                f"a numpy image must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got shape {image.shape}"
            )
        return to_pil_image(image, self.num_channels)  # dtype and value-range rules: optvq_hf.image_modes

    def _prepare(
        self, image: Any, resolution: int, do_resize: bool, do_center_crop: bool, resample: str
    ) -> np.ndarray:
        pil = to_pil_image(self._to_pil(image), self.num_channels)
        if min(pil.size) == 0:
            raise ValueError(f"image of size {pil.size[0]}x{pil.size[1]} has no pixels")
        if do_resize:
            width, height = pil.size
            scale = resolution / min(width, height)
            new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
            pil = pil.resize(new_size, resample=_RESAMPLE[resample])
        if do_center_crop:
            width, height = pil.size
            if width < resolution or height < resolution:
                raise ValueError(
                    f"image of size {width}x{height} is smaller than the crop {resolution}x{resolution}; "
                    f"enable do_resize"
                )
            left, top = (width - resolution) // 2, (height - resolution) // 2
            pil = pil.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(pil, dtype=np.float32)
        if array.ndim == 2:
            array = array[..., None]
        return array.transpose(2, 0, 1) / 127.5 - 1.0

    # -- public API ---------------------------------------------------------------------------------------------------
    def preprocess(
        self,
        images: Any,
        return_tensors: str | None = "pt",
        resolution: int | None = None,
        do_resize: bool | None = None,
        do_center_crop: bool | None = None,
        resample: str | None = None,
        **kwargs,
    ) -> BatchFeature:
        """Convert one image or a list of images to `pixel_values` in [-1, 1]."""
        if kwargs:
            raise ValueError(f"unknown preprocess argument(s): {sorted(kwargs)}")
        resolution = self.resolution if resolution is None else resolution
        do_resize = self.do_resize if do_resize is None else do_resize
        do_center_crop = self.do_center_crop if do_center_crop is None else do_center_crop
        resample = self.resample if resample is None else resample
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if len(images) == 0:
            raise ValueError("no images to preprocess")
        arrays = [self._prepare(image, resolution, do_resize, do_center_crop, resample) for image in images]
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"images have different sizes after preprocessing {sorted(shapes)}; enable center crop")
        pixel_values = np.stack(arrays).astype(np.float32)
        return BatchFeature(data={"pixel_values": pixel_values}, tensor_type=return_tensors)

    def __call__(self, images: Any, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

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


__all__ = ["OptVQImageProcessor"]
