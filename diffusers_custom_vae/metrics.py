"""Reconstruction metrics as pure functions of two image batches (B, 3, H, W) in [-1, 1].

PSNR, SSIM and MS-SSIM are torchmetrics' implementations (Gaussian window 11, sigma 1.5), computed per image on
[0, 1] and averaged, as published VAE evaluations report them. Images too small for that window still get a score:
SSIM shrinks the window to the image (an odd size, sigma in proportion), and MS-SSIM uses the scales that fit, down
to one (which is SSIM).
"""

import torch
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)

# MS-SSIM's standard weights, coarsest last (Wang et al. 2003).
_MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def _unit(images: torch.Tensor) -> torch.Tensor:
    return ((images.float() + 1) / 2).clamp(0, 1)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR in dB."""
    return peak_signal_noise_ratio(_unit(reconstruction), _unit(target), data_range=1.0, dim=(1, 2, 3))


def ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Gaussian window 11, sigma 1.5; smaller on images of less than 11 pixels)."""
    kernel_size = _window(*target.shape[-2:])
    return structural_similarity_index_measure(
        _unit(reconstruction), _unit(target), data_range=1.0, kernel_size=kernel_size, sigma=1.5 * kernel_size / 11
    )


def _window(height: int, width: int, kernel_size: int = 11) -> int:
    """The largest odd window up to `kernel_size` that fits in the image."""
    return min(kernel_size, (min(height, width) - 1) // 2 * 2 + 1)


def ms_ssim_scales(height: int, width: int, kernel_size: int = 11) -> int:
    """How many of MS-SSIM's 5 scales fit: each halves the image, and the coarsest must still exceed the window.
    torchmetrics also asks `side // (scales - 1) ** 2 > kernel_size - 1`, stricter from 3 scales on (5 scales need
    176 px, not 161)."""
    side = min(height, width)
    fits = [
        n
        for n in range(1, len(_MS_SSIM_BETAS) + 1)
        if side > (kernel_size - 1) * 2 ** (n - 1) and side // max(1, n - 1) ** 2 > kernel_size - 1
    ]
    return max(fits, default=1)


def ms_ssim(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean MS-SSIM. Images smaller than 161 px use fewer scales (weights renormalised) rather than failing; one
    scale is SSIM, which is what images of 20 px or less get."""
    scales = ms_ssim_scales(*target.shape[-2:])
    if scales == 1:
        return ssim(reconstruction, target)
    betas = tuple(b / sum(_MS_SSIM_BETAS[:scales]) for b in _MS_SSIM_BETAS[:scales])
    return multiscale_structural_similarity_index_measure(
        _unit(reconstruction), _unit(target), data_range=1.0, betas=betas, normalize="relu"
    )


def reconstruction_metrics(reconstruction: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """{"psnr", "ssim", "ms_ssim"} of one batch."""
    return {
        "psnr": psnr(reconstruction, target).item(),
        "ssim": ssim(reconstruction, target).item(),
        "ms_ssim": ms_ssim(reconstruction, target).item(),
    }
