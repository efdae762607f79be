"""Images between files, PIL and tensors. Tensors are (B, 3, H, W) or (3, H, W) in [-1, 1], as the VAE takes them."""

import os
from typing import BinaryIO

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageOps


def load_image(path: str | os.PathLike | BinaryIO) -> Image.Image:
    """Opens an image (a path or a binary file object) as RGB: greyscale, palette and alpha converted, EXIF rotation
    applied.

    Raises `ValueError` naming the file when it is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                image = image.convert("RGBA")  # composite alpha onto white, not black
                return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
            return image.convert("RGB")  # convert() reads every pixel: truncated files fail here
    except (OSError, SyntaxError, ValueError) as error:
        name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "image data")
        raise ValueError(f"Cannot read image {name!r}: {error}") from error


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(images: torch.Tensor) -> Image.Image | list[Image.Image]:
    """(3, H, W) -> one PIL image; (B, 3, H, W) -> a list. Values outside [-1, 1] are clipped."""
    if images.ndim == 3:
        return tensor_to_pil(images[None])[0]
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]


def crop_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crops (..., H, W) so that H and W are multiples of `multiple` (what the VAE's downsampling needs)."""
    height, width = images.shape[-2:]
    top, left = (height % multiple) // 2, (width % multiple) // 2
    return images[..., top : top + height - height % multiple, left : left + width - width % multiple]


def image_grid(rows: list[torch.Tensor], padding: int = 2) -> Image.Image:
    """One row per (B, 3, H, W) batch (e.g. originals above reconstructions), `padding` white pixels around and between
    the images. Raises `ValueError` when the batches differ in shape."""
    shapes = [tuple(row.shape) for row in rows]
    if len(set(shapes)) != 1 or len(shapes[0]) != 4:
        raise ValueError(f"image_grid needs (B, 3, H, W) batches of one shape, got shapes {shapes}")
    # diffusers' grid has no padding: each image brings its left and top border; then the right and bottom ones
    tiles = [ImageOps.expand(image, (padding, padding, 0, 0), "white") for row in rows for image in tensor_to_pil(row)]
    grid = make_image_grid(tiles, rows=len(rows), cols=shapes[0][0])
    return ImageOps.expand(grid, (0, 0, padding, padding), "white")
