"""The diffusers model the benchmarks hold `CustomVAE` against: an `AutoencoderKL` with Stable Diffusion's VAE layout
(DownEncoderBlock2D / UpDecoderBlock2D levels of two ResNet layers, attention in the middle block only, 4 latent
channels), at any width."""

import inspect

from diffusers import AutoencoderKL

from diffusers_custom_vae import CustomVAE

# Read from CustomVAE's signature, so that "equal width" follows its defaults if they change.
CUSTOM_VAE_WIDTHS = tuple(inspect.signature(CustomVAE.__init__).parameters["block_out_channels"].default)
STABLE_DIFFUSION_WIDTHS = (128, 256, 512, 512)  # the VAE of Stable Diffusion 1.x/2.x and SDXL


def autoencoder_kl(block_out_channels: tuple[int, ...] = CUSTOM_VAE_WIDTHS) -> AutoencoderKL:
    """A new `AutoencoderKL` (random weights) with Stable Diffusion's VAE layout at these widths: by default those of
    `CustomVAE()`, the equal-width model the benchmarks compare; `STABLE_DIFFUSION_WIDTHS` gives SD's VAE itself."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
    )
