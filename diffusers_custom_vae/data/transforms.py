"""Images -> tensors for training and evaluation: crops at the training resolution, and whole test images.

Every transform takes a PIL image and a numpy generator (its random draws; `None` where it draws nothing) and returns
a (3, H, W) float32 tensor in [-1, 1].
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..images import crop_to_multiple, pil_to_tensor

# Test images longer than this are downscaled, so evaluation memory stays bounded.
MAX_TEST_SIDE = 1024

Transform = Callable[[Image.Image, np.random.Generator | None], torch.Tensor]


def parse_resolution(resolution: int | Sequence[int], multiple: int = 8) -> tuple[int, int]:
    """`256`, `[256]` or `(H, W)` -> (H, W). Raises `ValueError` unless both are positive multiples of `multiple` (the
    model's downsampling factor)."""
    sizes = tuple(resolution) if isinstance(resolution, (tuple, list)) else (resolution,)
    sizes = sizes * 2 if len(sizes) == 1 else sizes
    valid = (isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in sizes)
    if len(sizes) != 2 or not all(valid):
        raise ValueError(f"resolution must be one or two positive integers (H W), got {resolution!r}")
    if any(size % multiple for size in sizes):
        raise ValueError(
            f"resolution must be multiples of {multiple}, the model's downsampling factor, got {resolution!r}; "
            f"e.g. {' '.join(str(max(multiple, size // multiple * multiple)) for size in sizes)}"
        )
    return sizes


@dataclass(frozen=True)
class ImageOptions:
    """What every data source does to its images: the training crop, the validation batch and the whole test images.

    Args:
        resolution (`int` or `(H, W)`): Training size; multiples of `downsample_factor`.
        downsample_factor (`int`, *optional*, defaults to 8): The model's; test images are cropped to its multiples.
        center_crop (`bool`, *optional*, defaults to False): Centre rather than random training crops.
        random_flip (`bool`, *optional*, defaults to False): Random horizontal flips in training.
        seed (`int`, *optional*, defaults to 0): Seed of the augmentation (and of a dataset's held-out rows).
        num_validation_images (`int`, *optional*, defaults to 4): Size of the validation batch.
    """

    resolution: tuple[int, int]
    downsample_factor: int = 8
    center_crop: bool = False
    random_flip: bool = False
    seed: int = 0
    num_validation_images: int = 4

    def __post_init__(self):
        object.__setattr__(self, "resolution", parse_resolution(self.resolution, self.downsample_factor))

    @property
    def train_transform(self) -> "ResizeCrop":
        return ResizeCrop(self.resolution, self.center_crop, self.random_flip)

    @property
    def validation_transform(self) -> "ResizeCrop":
        return ResizeCrop(self.resolution, center_crop=True)

    @property
    def test_transform(self) -> "WholeImage":
        return WholeImage(multiple=self.downsample_factor)


@dataclass(frozen=True)
class ResizeCrop:
    """A centre or random crop of the resolution's aspect ratio, as large as the image allows, resized (Lanczos) to
    (H, W) (what diffusers' train_text_to_image does by scaling the shorter side first, then cropping); then an
    optional random horizontal flip. The crop is cut before resizing, so memory follows the output size whatever the
    image's shape (a 20000x1 image does not become a 1280000x64 one first)."""

    resolution: tuple[int, int]
    center_crop: bool = False
    random_flip: bool = False

    def __call__(self, image: Image.Image, rng: np.random.Generator | None) -> torch.Tensor:
        height, width = self.resolution
        scale = min(image.height / height, image.width / width)  # source pixels per output pixel
        crop_height, crop_width = height * scale, width * scale  # fractional: the box fits the image exactly
        if self.center_crop:
            top, left = (image.height - crop_height) / 2, (image.width - crop_width) / 2
        else:
            top, left = rng.uniform(0, image.height - crop_height), rng.uniform(0, image.width - crop_width)
        box = (left, top, left + crop_width, top + crop_height)
        image = image.resize((width, height), Image.Resampling.LANCZOS, box=box)
        return pil_to_tensor(_maybe_flip(image, self.random_flip, rng))

    def fixed(self) -> "ResizeCrop":
        """The same size, one image per input: a centre crop, no flip (as DiT caches its data)."""
        return ResizeCrop(self.resolution, center_crop=True)


@dataclass(frozen=True)
class MultiScaleCrop:
    """A random crop of the resolution's aspect ratio, resized (Lanczos) to (H, W), then an optional random
    horizontal flip. Its scale is log-uniform between native pixels and the largest crop that fits (an image smaller
    than the resolution always gives its largest crop, upscaled)."""

    resolution: tuple[int, int]
    random_flip: bool = False

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        height, width = self.resolution
        largest = min(image.height / height, image.width / width)  # crop size / output size
        scale = math.exp(rng.uniform(math.log(min(1.0, largest)), math.log(largest)))
        crop_height, crop_width = min(image.height, round(height * scale)), min(image.width, round(width * scale))
        top, left = rng.integers(image.height - crop_height + 1), rng.integers(image.width - crop_width + 1)
        image = image.crop((left, top, left + crop_width, top + crop_height))
        image = image.resize((width, height), Image.Resampling.LANCZOS)
        return pil_to_tensor(_maybe_flip(image, self.random_flip, rng))

    def fixed(self) -> "MultiScaleCrop":
        """No flip; with the dataset's epoch left at 0 each index keeps one crop: a fixed set of crops."""
        return MultiScaleCrop(self.resolution)


@dataclass(frozen=True)
class WholeImage:
    """The whole image for evaluation: downscaled (Lanczos) to at most `max_side`, then centre-cropped to multiples
    of `multiple` (the model's downsampling factor). Images smaller than `multiple` are enlarged to it; images longer
    than `max_side / multiple` times their width (or height) are first centre-cropped to that aspect ratio, so that
    neither rule can push the other side past `max_side`."""

    max_side: int = MAX_TEST_SIDE
    multiple: int = 8

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        longest_ratio = self.max_side / self.multiple
        width, height = (
            min(image.width, round(image.height * longest_ratio)),
            min(image.height, round(image.width * longest_ratio)),
        )
        if (width, height) != image.size:
            left, top = (image.width - width) // 2, (image.height - height) // 2
            image = image.crop((left, top, left + width, top + height))
        scale = max(min(1.0, self.max_side / max(image.size)), self.multiple / min(image.size))
        if scale != 1:
            size = (max(self.multiple, round(image.width * scale)), max(self.multiple, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        return crop_to_multiple(pil_to_tensor(image), self.multiple)


def _maybe_flip(image: Image.Image, random_flip: bool, rng: np.random.Generator | None) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random_flip and rng.random() < 0.5 else image
