"""diffusers_custom_vae.images: the grid of originals above reconstructions."""

import numpy as np
import pytest
import torch

from diffusers_custom_vae.images import image_grid, tensor_to_pil


@pytest.mark.parametrize("padding", [0, 3])
def test_image_grid_puts_each_batch_in_a_row_on_white_padding(padding):
    torch.manual_seed(0)
    rows = [torch.rand(3, 3, 5, 7) * 2 - 1, torch.rand(3, 3, 5, 7) * 2 - 1]  # 2 rows of 3 images, 5x7 px
    grid = np.asarray(image_grid(rows, padding=padding))

    assert grid.shape == (2 * (5 + padding) + padding, 3 * (7 + padding) + padding, 3)
    unpainted = np.ones(grid.shape[:2], dtype=bool)
    for r, row in enumerate(rows):
        for c, image in enumerate(tensor_to_pil(row)):
            top, left = padding + r * (5 + padding), padding + c * (7 + padding)
            np.testing.assert_array_equal(grid[top : top + 5, left : left + 7], np.asarray(image))
            unpainted[top : top + 5, left : left + 7] = False
    assert (grid[unpainted] == 255).all() and unpainted.sum() == grid.shape[0] * grid.shape[1] - 6 * 5 * 7


def test_image_grid_refuses_batches_of_different_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\), \(3, 3, 8, 8\)"):
        image_grid([torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8)])
