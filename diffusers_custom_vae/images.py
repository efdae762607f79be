"""Images between files, PIL and tensors. Tensors are (B, 3, H, W) or (3, H, W) in [-1, 1], as the VAE takes them."""

import os
from typing import BinaryIO

import numpy as np
import torch
from diffusers.utils import make_image_grid
from PIL import Image, ImageOps


def load_image(path: str | os.PathLike | BinaryIO) -> Image.Image:
    """Opens an image (a path or a binary file object) as 8-bit RGB: EXIF rotation applied, then converted by
    `to_rgb` (greyscale, palette, 16-bit and float converted, alpha and transparent colours composited onto white).

    Raises `ValueError` naming the file when it is missing, truncated, not an image, of values outside the range
    `to_rgb` expects, or a decompression bomb (more than twice `PIL.Image.MAX_IMAGE_PIXELS` pixels).
    """
    try:
        with Image.open(path) as image:
            return to_rgb(ImageOps.exif_transpose(image))  # converting reads every pixel: truncated files fail here
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        name = os.fspath(path) if isinstance(path, (str, os.PathLike)) else getattr(path, "name", "image data")
        raise ValueError(f"Cannot read image {name!r}: {error}") from error


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB: greyscale, palette, 16-bit and float converted, alpha and transparent
    colours composited onto white.

    16-bit images are scaled to 8 bits (65535 -> 255); float images (mode "F") must hold values in [0, 1], and 32-bit
    integer ones (mode "I") values in [0, 65535], the range of the 16-bit PNGs that older Pillow opens in that mode
    (`ValueError` otherwise).
    """
    if image.mode.startswith("I") or image.mode == "F":
        image = _scale_to_8_bits(image)  # convert() would clip: every level above 255 would become white
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")  # composite alpha (or the transparent colour) onto white, not black
        return Image.alpha_composite(Image.new("RGBA", image.size, "white"), image).convert("RGB")
    return image.convert("RGB")


def _scale_to_8_bits(image: Image.Image) -> Image.Image:
    """A greyscale image of mode I;16 (any byte order), I or F -> L, or LA where one grey level is transparent."""
    levels = np.asarray(image)
    top = 1.0 if image.mode == "F" else 65535
    if not np.isfinite(levels).all():
        raise ValueError(f"a mode {image.mode} image holding NaN or infinite values")
    low, high = levels.min().item(), levels.max().item()
    if low < 0 or high > top:
        raise ValueError(f"a mode {image.mode} image with values in [{low:g}, {high:g}]; expected [0, {top:g}]")
    grey = Image.fromarray(np.rint(levels.astype(np.float32) * (255 / top)).astype(np.uint8))
    transparent = image.info.get("transparency")  # a 16-bit level: compared before scaling merges its neighbours
    if transparent is None:
        return grey
    return Image.merge("LA", (grey, Image.fromarray(np.where(levels == transparent, 0, 255).astype(np.uint8))))


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image of any mode -> (3, H, W) float32 in [-1, 1], converted to RGB by `to_rgb` as `load_image` converts
    (16-bit and float images scaled, not clipped; alpha composited onto white, not dropped to black).

    Raises `TypeError` for anything but a PIL image, `ValueError` for one `to_rgb` cannot convert.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(
            f"pil_to_tensor expected a PIL image, got a {type(image).__module__}.{type(image).__qualname__}."
        )
    try:
        array = np.asarray(to_rgb(image), dtype=np.float32)
    except ValueError as error:
        raise ValueError(f"pil_to_tensor cannot convert this image: {error}.") from error
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0


def tensor_to_pil(images: torch.Tensor) -> Image.Image | list[Image.Image]:
    """(3, H, W) -> one PIL image; (B, 3, H, W) -> a list. Values outside [-1, 1] are clipped.

    Raises `TypeError` for anything but a floating-point tensor (0-255 pixels would all become white), `ValueError`
    for other shapes and for NaN or infinite values (NaN would become black).
    """
    if not isinstance(images, torch.Tensor):
        what = f"{type(images).__module__}.{type(images).__qualname__}"
        raise TypeError(f"tensor_to_pil expected a tensor of images, got a {what}.")
    if not images.is_floating_point():
        raise TypeError(
            f"tensor_to_pil expected a floating-point tensor of images in [-1, 1], got a {images.dtype} tensor "
            "(x / 127.5 - 1 converts 0-255 pixels)."
        )
    if images.ndim not in (3, 4) or images.shape[-3] != 3:
        raise ValueError(
            f"tensor_to_pil expected images of shape (3, H, W) or (B, 3, H, W), got {tuple(images.shape)}."
        )
    non_finite = images.numel() - torch.isfinite(images).sum().item()
    if non_finite:
        raise ValueError(f"tensor_to_pil expected finite images, got {non_finite} NaN or infinite values.")
    if images.ndim == 3:
        return tensor_to_pil(images[None])[0]
    array = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]


def crop_to_multiple(images: torch.Tensor, multiple: int) -> torch.Tensor:
    """Centre-crops (..., H, W) so that H and W are multiples of `multiple` (what the VAE's downsampling needs).

    Raises `ValueError` for a `multiple` that is not a positive int, and for images smaller than it (nothing would
    remain)."""
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"crop_to_multiple needs a positive int as `multiple`, got {multiple!r}.")
    height, width = images.shape[-2:]
    if height < multiple or width < multiple:
        raise ValueError(
            f"crop_to_multiple: images of {height}x{width} pixels are smaller than the multiple {multiple}: nothing "
            "remains; enlarge them first."
        )
    top, left = (height % multiple) // 2, (width % multiple) // 2
    return images[..., top : top + height - height % multiple, left : left + width - width % multiple]


def image_grid(rows: list[torch.Tensor], padding: int = 2) -> Image.Image:
    """One row per (B, 3, H, W) batch (e.g. originals above reconstructions), `padding` white pixels around and between
    the images. Raises `ValueError` when the batches differ in shape."""
    for row in rows:
        if not isinstance(row, torch.Tensor):
            raise TypeError(
                f"image_grid needs (B, 3, H, W) tensors, got a {type(row).__module__}.{type(row).__name__}"
            )
    shapes = [tuple(row.shape) for row in rows]
    if len(set(shapes)) != 1 or len(shapes[0]) != 4:
        raise ValueError(f"image_grid needs (B, 3, H, W) batches of one shape, got shapes {shapes}")
    # diffusers' grid has no padding: each image brings its left and top border; then the right and bottom ones
    tiles = [ImageOps.expand(image, (padding, padding, 0, 0), "white") for row in rows for image in tensor_to_pil(row)]
    grid = make_image_grid(tiles, rows=len(rows), cols=shapes[0][0])
    return ImageOps.expand(grid, (0, 0, padding, padding), "white")
