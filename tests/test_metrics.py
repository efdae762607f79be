"""metrics.py on images whose scores are known: PSNR from its definition, SSIM's and MS-SSIM's bounds, and the
number of MS-SSIM scales that fit an image."""

import math

import pytest
import torch

from diffusers_custom_vae.metrics import ms_ssim, ms_ssim_scales, psnr, reconstruction_metrics, ssim


def random_images(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_psnr_follows_its_definition_per_image_then_averaged():
    target = torch.full((2, 3, 16, 16), -1.0)  # black, 0 on the [0, 1] scale the metric uses
    reconstruction = target.clone()
    reconstruction[0] += 0.2  # 0.1 on [0, 1]: MSE 0.01, 20 dB
    reconstruction[1] += 0.02  # 0.01 on [0, 1]: MSE 1e-4, 40 dB
    assert psnr(reconstruction, target).item() == pytest.approx((20 + 40) / 2, abs=1e-3)


def test_psnr_clips_to_the_image_range_first():
    """Values beyond [-1, 1] count as the nearest valid pixel, as they would once saved as an image."""
    target = random_images(1, 3, 16, 16)
    assert psnr(target.clamp(-1, 1) * 3, target.clamp(-1, 1) * 3).item() == math.inf
    assert psnr(torch.full_like(target, 5.0), torch.ones_like(target)).item() == math.inf


def test_ssim_and_ms_ssim_are_one_for_identical_images_and_lower_otherwise():
    images = random_images(2, 3, 64, 64)
    noisy = (images + 0.3 * random_images(2, 3, 64, 64, seed=1)).clamp(-1, 1)
    assert ssim(images, images).item() == pytest.approx(1.0, abs=1e-5)
    assert ms_ssim(images, images).item() == pytest.approx(1.0, abs=1e-5)
    assert 0 < ssim(noisy, images).item() < 0.99
    assert 0 < ms_ssim(noisy, images).item() < 0.99


@pytest.mark.parametrize(
    "side, scales",
    [(11, 1), (20, 1), (21, 2), (43, 2), (44, 3), (98, 3), (99, 4), (175, 4), (176, 5), (512, 5)],
)
def test_ms_ssim_uses_the_scales_that_fit(side, scales):
    """The coarsest scale must exceed the window, and torchmetrics' own rule must hold (5 scales need 176 px)."""
    assert ms_ssim_scales(side, side + 100) == scales == ms_ssim_scales(side + 100, side)
    images = random_images(1, 3, side, side + 3)
    assert math.isfinite(ms_ssim(images * 0.9, images).item())


@pytest.mark.parametrize("height, width", [(1, 1), (2, 2), (8, 8), (12, 12), (8, 40), (41, 41), (161, 170)])
def test_every_metric_copes_with_any_image_size(height, width):
    """Held-out images come in any size the data layer lets through: no metric may fail on one."""
    images = random_images(1, 3, height, width)
    metrics = reconstruction_metrics((images * 0.9).clamp(-1, 1), images)
    assert all(math.isfinite(value) for value in metrics.values()), metrics
    assert 0 < metrics["ssim"] <= 1 and 0 < metrics["ms_ssim"] <= 1


def test_ms_ssim_on_small_images_uses_fewer_scales_rather_than_failing():
    """torchmetrics' 5-scale MS-SSIM refuses images of 160 px or less; ours renormalises the weights it keeps."""
    images = random_images(1, 3, 48, 48)
    noisy = (images + 0.3 * random_images(1, 3, 48, 48, seed=1)).clamp(-1, 1)
    value = ms_ssim(noisy, images).item()
    assert math.isfinite(value) and 0 < value < 1


def test_reconstruction_metrics_reports_all_three_as_floats():
    images = random_images(1, 3, 32, 48)
    metrics = reconstruction_metrics(images * 0.9, images)
    assert set(metrics) == {"psnr", "ssim", "ms_ssim"}
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
    assert metrics["psnr"] == pytest.approx(psnr(images * 0.9, images).item())
