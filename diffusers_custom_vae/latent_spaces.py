"""Latent spaces: which one a VAE's latents live in, and whether two VAEs share one.

A diffusion model denoises latents of one latent space: the one of the VAE it was trained with. A VAE records the
space its latents live in in its config (`latent_space`): `None` for its own (trained from scratch), or the name of
the space it was aligned to (by distillation, or by fine-tuning only its decoder). Diffusers' own VAEs have no such
field: `latent_space_of` recognises the pretrained Stable Diffusion VAEs by their scaling factor. A space with no
name is known by what encodes into it: `encoder_fingerprint(vae)` hashes the weights of a VAE's encoder, and a VAE
distilled from it records that fingerprint as its `latent_space`.
"""

import hashlib
import math

import torch
from diffusers import AutoencoderKL, ModelMixin

# Scaling factor of a pretrained AutoencoderKL -> the latent space it encodes into. Fine-tunes of a decoder
# (sd-vae-ft-mse, sd-vae-ft-ema) keep the encoder, the latent space and the scaling factor.
KNOWN_LATENT_SPACES = {
    0.18215: "stable-diffusion",  # the VAE of Stable Diffusion 1.x and 2.x
    0.13025: "stable-diffusion-xl",  # the VAE of SDXL
}
FINGERPRINT_PREFIX = "encoder-sha256:"
# What encodes images into latents: the encoder, and an AutoencoderKL's quant_conv after it.
ENCODER_PARTS = ("encoder.", "quant_conv.")


class LatentSpaceWarning(UserWarning):
    """A pipeline's UNet was trained on latents of another latent space than the new VAE's: expect noise."""


def latent_space_of(vae) -> str | None:
    r"""
    The name of the latent space `vae` encodes into, or `None` when it has its own (or it is not known).

    A VAE whose config has a `latent_space` field ([`CustomVAE`]) says it. A diffusers [`AutoencoderKL`] is
    recognised by its scaling factor, as `KNOWN_LATENT_SPACES` lists: 0.18215 is `"stable-diffusion"` (SD 1.x and
    2.x), 0.13025 is `"stable-diffusion-xl"`. Any other VAE, and no VAE at all, gives `None`.

    Args:
        vae (`ModelMixin`, *optional*): A VAE, or `None`.

    Returns:
        `str` or `None`: the latent space's name.
    """
    if vae is None:
        return None
    if not isinstance(vae, ModelMixin):
        got = f"the {type(vae).__name__} {vae!r:.80}"
        raise TypeError(f"latent_space_of expected a VAE (e.g. a CustomVAE or an AutoencoderKL) or None, got {got}.")
    if "latent_space" in vae.config:
        return vae.config.latent_space
    if isinstance(vae, AutoencoderKL):
        for scaling_factor, name in KNOWN_LATENT_SPACES.items():
            if math.isclose(vae.config.scaling_factor, scaling_factor, rel_tol=1e-4):
                return name
    return None


def encoder_fingerprint(vae) -> str:
    r"""
    An identity for the latent space of a VAE that has no name for it: `"encoder-sha256:<f16>:<bf16>"`, hashes of the
    weights that encode images into latents (the encoder, and an `AutoencoderKL`'s `quant_conv`), rounded to float16
    and to bfloat16, so that the same VAE still matches once a pipeline casts it to half precision. A VAE's decoder
    does not enter it: fine-tuning the decoder keeps the latent space.
    """
    return FINGERPRINT_PREFIX + ":".join(_encoder_hash(vae, dtype) for dtype in (torch.float16, torch.bfloat16))


def latent_space_identity(vae) -> str:
    """The name of `vae`'s latent space, or its encoder fingerprint when the space has no name: what a VAE aligned
    to `vae` (distilled from it) records as its `latent_space`."""
    return latent_space_of(vae) or encoder_fingerprint(vae)


def shares_latent_space(vae, reference) -> bool:
    r"""
    Whether `vae`'s latents are known to live in `reference`'s latent space: both name the same space, or `vae`
    records the encoder fingerprint of `reference` (it was distilled from it).

    Args:
        vae (`ModelMixin`): The VAE in question (e.g. the new VAE of a pipeline).
        reference (`ModelMixin`, *optional*): The VAE whose space counts (e.g. the one the pipeline's UNet knows).
    """
    space = latent_space_of(vae)
    if space is None or reference is None:
        return False
    if space.startswith(FINGERPRINT_PREFIX):
        as_float16, as_bfloat16 = space.removeprefix(FINGERPRINT_PREFIX).partition(":")[::2]
        if reference.dtype == torch.bfloat16:
            return _encoder_hash(reference, torch.bfloat16) == as_bfloat16
        return _encoder_hash(reference, torch.float16) == as_float16  # float32 and float16 round alike to float16
    return space == latent_space_of(reference)


def describe_latent_space(vae) -> str:
    """The space `vae` encodes into, in words, for messages."""
    space = latent_space_of(vae)
    if space is None:
        return "an unnamed latent space"
    if space.startswith(FINGERPRINT_PREFIX):
        return f"the latent space of the VAE it was distilled from ({space[: len(FINGERPRINT_PREFIX) + 8]}...)"
    return f"the {space!r} latent space"


def _encoder_hash(vae, dtype: torch.dtype) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(ENCODER_PARTS):
            values = tensor.detach().to("cpu", dtype).contiguous().view(torch.int16)  # the 16-bit patterns
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]
