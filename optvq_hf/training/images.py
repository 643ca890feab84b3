"""The one image-grid writer of the scripts: reconstruction grids (originals above reconstructions), sample grids."""

from __future__ import annotations

import math

import numpy as np
import PIL.Image
import torch


def to_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """Images in [-1, 1], (N, C, H, W) tensor or (N, H, W, C) uint8 array, as a uint8 array (N, H, W, C)."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8 or images.ndim != 4:
            raise ValueError(f"expected a uint8 array (N, H, W, C), got {images.dtype} of shape {images.shape}")
        return images
    if images.ndim != 4:
        raise ValueError(f"expected images (N, C, H, W), got shape {tuple(images.shape)}")
    array = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return array.permute(0, 2, 3, 1).numpy()


def image_grid(
    images: torch.Tensor | np.ndarray, columns: int, pad: int = 1, fill: int = 128, scale: int = 1
) -> PIL.Image.Image:
    """Images (see `to_uint8`) laid out `columns` per row, separated by `pad` pixels of grey `fill`, each image
    enlarged `scale` times (nearest neighbour, so that small images stay sharp)."""
    array = to_uint8(images)
    if columns < 1 or pad < 0 or scale < 1:
        raise ValueError(f"columns and scale must be >= 1 and pad >= 0, got {columns}, {scale}, {pad}")
    count, height, width, channels = array.shape
    rows = max(1, math.ceil(count / columns))
    grid = np.full((rows * (height + pad) + pad, columns * (width + pad) + pad, channels), fill, dtype=np.uint8)
    for index, image in enumerate(array):
        top, left = pad + (index // columns) * (height + pad), pad + (index % columns) * (width + pad)
        grid[top : top + height, left : left + width] = image
    picture = PIL.Image.fromarray(grid[..., 0] if channels == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), PIL.Image.Resampling.NEAREST)
    return picture


def reconstruction_grid(
    originals: torch.Tensor | np.ndarray, reconstructions: torch.Tensor | np.ndarray, pad: int = 2
) -> PIL.Image.Image:
    """Originals on the top row, their reconstructions below, `pad` white pixels between them (no outer border)."""
    top, bottom = to_uint8(originals), to_uint8(reconstructions)
    if top.shape != bottom.shape:
        raise ValueError(f"originals {top.shape} and reconstructions {bottom.shape} differ in shape")
    grid = image_grid(np.concatenate([top, bottom]), columns=top.shape[0], pad=pad, fill=255)
    return grid.crop((pad, pad, grid.width - pad, grid.height - pad))
