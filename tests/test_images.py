"""The one grid writer: layout, padding and the [-1, 1] -> uint8 mapping, by hand-worked pixels."""

import numpy as np
import pytest
import torch

from optvq_hf.training.images import image_grid, reconstruction_grid, to_uint8


def test_to_uint8_maps_the_range_and_rounds():
    images = torch.tensor([-1.0, 0.0, 1.0, 2.0]).reshape(1, 1, 2, 2)
    assert to_uint8(images)[0, :, :, 0].tolist() == [[0, 128], [255, 255]]  # 127.5 rounds to 128; clipped above


def test_image_grid_places_each_image_with_padding():
    images = np.stack([np.full((2, 3, 1), value, dtype=np.uint8) for value in (10, 20, 30)])
    grid = np.asarray(image_grid(images, columns=2, pad=1, fill=99))
    assert grid.shape == (2 * 3 + 1, 2 * 4 + 1)  # 2 rows of (2 + 1), 2 columns of (3 + 1), plus the outer pad
    assert grid[1, 1] == 10 and grid[1, 5] == 20 and grid[4, 1] == 30
    assert grid[0, 0] == 99 and grid[4, 5] == 99  # the border and the empty fourth cell
    assert np.asarray(image_grid(images, columns=3, scale=2)).shape == (2 * 4, 2 * 13)


def test_reconstruction_grid_puts_originals_above_without_a_border():
    originals = -torch.ones(2, 3, 4, 4)
    reconstructions = torch.ones(2, 3, 4, 4)
    grid = np.asarray(reconstruction_grid(originals, reconstructions, pad=2))
    assert grid.shape == (4 + 2 + 4, 4 + 2 + 4, 3)
    assert (grid[:4, :4] == 0).all() and (grid[6:, 6:] == 255).all() and (grid[4:6] == 255).all()
    with pytest.raises(ValueError, match="differ in shape"):
        reconstruction_grid(originals, reconstructions[:1])
