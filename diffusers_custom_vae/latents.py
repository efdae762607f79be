"""Latent statistics: the scaling factor (and shift) that give a diffusion model unit-variance latents."""

import math
from collections.abc import Iterable

import torch
from diffusers import ModelMixin
from tqdm.auto import tqdm


class _RunningMoments:
    """Mean and variance of a stream of tensors' elements, in float64, merged batch by batch (Chan et al.)."""

    def __init__(self):
        self.count, self.mean, self.sum_of_squares = 0, 0.0, 0.0  # sum of squared deviations from the mean

    def update(self, values: torch.Tensor):
        values = values.detach().to("cpu", torch.float64).flatten()
        count, mean = values.numel(), values.mean().item()
        sum_of_squares = (values - mean).square().sum().item()
        total = self.count + count
        delta = mean - self.mean
        self.mean += delta * count / total
        self.sum_of_squares += sum_of_squares + delta**2 * self.count * count / total
        self.count = total

    @property
    def std(self) -> float:
        return (self.sum_of_squares / self.count) ** 0.5


def _check_images(images, in_channels: int) -> torch.Tensor:
    if not isinstance(images, torch.Tensor):
        raise TypeError(
            f"estimate_scaling_factor expected tensors of images, got a batch of type {type(images).__name__}; "
            "pass e.g. `(batch['pixel_values'] for batch in dataloader)`."
        )
    if not images.is_floating_point():
        raise TypeError(
            f"estimate_scaling_factor expected floating-point images in [-1, 1], got {images.dtype}; convert them "
            "with `diffusers_custom_vae.images.pil_to_tensor` (or x / 127.5 - 1 for 0-255 pixels)."
        )
    if images.ndim != 4 or images.shape[1] != in_channels:
        raise ValueError(f"Expected images of shape (batch, {in_channels}, height, width), got {tuple(images.shape)}.")
    non_finite = images.numel() - torch.isfinite(images).sum().item()
    if non_finite:  # min and max below would not see NaN, and NaN latents would give a NaN scaling factor
        raise ValueError(f"These images hold {non_finite} NaN or infinite values; expected values in [-1, 1].")
    low, high = images.min().item(), images.max().item()
    if low < -1.001 or high > 1.001:
        raise ValueError(
            f"Expected images in [-1, 1], got values in [{low:g}, {high:g}]; convert them with "
            "`diffusers_custom_vae.images.pil_to_tensor` (or x / 127.5 - 1 for 0-255 pixels)."
        )
    return images


@torch.no_grad()
def estimate_scaling_factor(
    vae,
    images: torch.Tensor | Iterable[torch.Tensor],
    shift: bool = False,
    register: bool = False,
    generator: torch.Generator | None = None,
) -> float | tuple[float, float]:
    r"""
    Estimate the `scaling_factor` that gives a VAE's latents unit variance, as the Stable Diffusion VAEs define it.

    Encodes the images, samples latents from the posteriors, and returns `1 / std` of all their elements (the
    standard deviation around their mean, pooled over batch, channels and positions). Pipelines multiply latents by
    it before the diffusion model sees them. The statistics are accumulated in float64, batch by batch, so
    `images` may be a whole dataset.

    Args:
        vae (`CustomVAE` or `AutoencoderKL`): The VAE, in the dtype and on the device it should encode with.
        images (`torch.Tensor` or iterable of `torch.Tensor`):
            One batch `(batch_size, 3, height, width)` in [-1, 1], or an iterable of such batches (e.g. a
            `DataLoader`; a progress bar shows).
        shift (`bool`, *optional*, defaults to `False`):
            Whether to also return the `shift_factor`, the latents' mean (the SD3/Flux convention, where pipelines
            use `(latents - shift_factor) * scaling_factor`). Stable Diffusion 1.x/2.x and SDXL pipelines ignore it.
        register (`bool`, *optional*, defaults to `False`):
            Whether to write the estimate into `vae.config` (`scaling_factor`, and `shift_factor` when `shift`), so
            that `save_pretrained` saves it. A VAE that records the latent space it was aligned to (`latent_space`)
            no longer claims it (`latent_space=None`): a UNet of that space expects its latents on its scale.
        generator (`torch.Generator`, *optional*): Makes the posterior sampling deterministic.

    Returns:
        `float`, or `tuple[float, float]` when `shift`: the `scaling_factor`, and the `shift_factor`.
    """
    if not (isinstance(vae, ModelMixin) and callable(getattr(vae, "encode", None))):
        got = "None" if vae is None else f"the {type(vae).__name__} {vae!r:.80}"
        raise TypeError(
            f"estimate_scaling_factor expected a VAE (e.g. a CustomVAE or an AutoencoderKL), got {got}; load it "
            "first, e.g. with CustomVAE.from_pretrained."
        )
    batches = [images] if isinstance(images, torch.Tensor) else tqdm(images, desc="Estimating the scaling factor")
    moments = _RunningMoments()
    for batch in batches:
        batch = _check_images(batch, vae.config.in_channels).to(vae.device)
        moments.update(vae.encode(batch).latent_dist.sample(generator=generator))
        if not (math.isfinite(moments.mean) and math.isfinite(moments.std)):  # stop at the first bad batch
            raise ValueError(
                f"The latents of these images are not finite (NaN or infinite) with this {type(vae).__name__}: are "
                "its weights finite, and does its dtype hold its activations (float16 overflows where float32 "
                "does not)?"
            )
    if moments.count == 0:
        raise ValueError("estimate_scaling_factor needs at least one batch of images; the iterable was empty.")
    if moments.std == 0:
        raise ValueError("The latents of these images are all equal: their variance is 0, so no scaling factor fits.")

    scaling_factor = 1.0 / moments.std
    if register:
        vae.register_to_config(scaling_factor=scaling_factor, **({"shift_factor": moments.mean} if shift else {}))
        if vae.config.get("latent_space") is not None:
            vae.register_to_config(latent_space=None)
    return (scaling_factor, moments.mean) if shift else scaling_factor
