"""Evaluating and comparing VAEs on held-out images: metrics, and a grid to look at."""

from collections.abc import Iterable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import image_grid
from .metrics import reconstruction_metrics


@torch.no_grad()
def evaluate_vae(vae, images: Iterable[torch.Tensor], desc: str = "evaluating") -> dict[str, float]:
    r"""
    Mean PSNR, SSIM and MS-SSIM of a VAE's reconstructions (decoded from the posterior's mode).

    Args:
        vae (`CustomVAE` or `AutoencoderKL`): The VAE, on the device to evaluate on.
        images (iterable of `torch.Tensor`): Images (3, H, W) in [-1, 1], one at a time, so sizes may differ (H and
            W multiples of the VAE's downsampling).
        desc (`str`, *optional*): The progress bar's label.

    Returns:
        `dict[str, float]`: `psnr`, `ssim`, `ms_ssim`, averaged over the images.
    """
    scores = []
    for image in tqdm(images, desc=desc):
        image = image[None].to(vae.device, vae.dtype)
        scores.append(reconstruction_metrics(vae(image, sample_posterior=False).sample.clamp(-1, 1), image))
    if not scores:
        raise ValueError("evaluate_vae needs at least one image.")
    return {name: sum(score[name] for score in scores) / len(scores) for name in scores[0]}


def common_crop(images: Iterable[torch.Tensor], count: int = 8, max_side: int = 256, multiple: int = 8):
    """The first `count` images (3, H, W), centre-cropped to one square size (the smallest side among them, at most
    `max_side`, a multiple of `multiple`), as a (B, 3, S, S) tensor: held-out images of any sizes, ready for a grid."""
    chosen = [image for image, _ in zip(images, range(count))]
    side = min(max_side, *(min(image.shape[-2:]) for image in chosen)) // multiple * multiple
    crops = []
    for image in chosen:
        top, left = (image.shape[-2] - side) // 2, (image.shape[-1] - side) // 2
        crops.append(image[:, top : top + side, left : left + side])
    return torch.stack(crops)


@torch.no_grad()
def comparison_grid(vaes: Sequence, images: torch.Tensor) -> Image.Image:
    """Originals (top row), then one row of reconstructions per VAE; `images` is a (B, 3, H, W) batch in [-1, 1]."""
    rows = [images]
    for vae in vaes:
        rows.append(vae(images.to(vae.device, vae.dtype), sample_posterior=False).sample.clamp(-1, 1).float().cpu())
    return image_grid(rows)
