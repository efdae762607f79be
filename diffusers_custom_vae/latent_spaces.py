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
from diffusers import AutoencoderKL, AutoencoderTiny, ModelMixin

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
    Whether `vae`'s latents are known to live in `reference`'s latent space (the relation is symmetric): both record
    the same space (a name, or the encoder fingerprint of the VAE both were distilled from), or one records the
    encoder fingerprint of the other (it was distilled from it). Encoders are hashed only in that last case.

    Diffusers' [`AutoencoderTiny`] (TAESD) records no space, but exists only as a decoder distilled into a pretrained
    VAE's space: it shares the space of any VAE `latent_space_of` names (its latent channels tell SD's and SDXL's
    4-channel spaces from SD3's and Flux's 16, not SD's from SDXL's).

    Args:
        vae (`ModelMixin`): The VAE in question (e.g. the new VAE of a pipeline).
        reference (`ModelMixin`, *optional*): The VAE whose space counts (e.g. the one the pipeline's UNet knows).
    """
    if vae is None or reference is None:
        return False
    space, reference_space = latent_space_of(vae), latent_space_of(reference)
    if space is not None and space == reference_space:
        return True
    for tiny, other_space in ((vae, reference_space), (reference, space)):
        if isinstance(tiny, AutoencoderTiny) and other_space is not None and not is_fingerprint(other_space):
            return True
    return _records_encoder_of(vae, reference) or _records_encoder_of(reference, vae)


def is_fingerprint(space: str | None) -> bool:
    """Whether a recorded `latent_space` is an encoder fingerprint (a space with no name)."""
    return space is not None and space.startswith(FINGERPRINT_PREFIX)


def _records_encoder_of(student, teacher) -> bool:
    """Whether `student` records `teacher`'s encoder fingerprint as its latent space."""
    space = latent_space_of(student)
    if not is_fingerprint(space) or latent_space_of(teacher) is not None:  # a named teacher gave its name instead
        return False
    as_float16, as_bfloat16 = space.removeprefix(FINGERPRINT_PREFIX).partition(":")[::2]
    if teacher.dtype == torch.bfloat16:
        return _encoder_hash(teacher, torch.bfloat16) == as_bfloat16
    return _encoder_hash(teacher, torch.float16) == as_float16  # float32 and float16 round alike to float16


def describe_latent_space(vae) -> str:
    """The space `vae` encodes into, in words, for messages."""
    space = latent_space_of(vae)
    if space is None:
        return "an unnamed latent space"
    if is_fingerprint(space):
        return f"the latent space of the VAE it was distilled from ({space[: len(FINGERPRINT_PREFIX) + 8]}...)"
    return f"the {space!r} latent space"


def _encoder_hash(vae, dtype: torch.dtype) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(_state_dict(vae).items()):
        if name.startswith(ENCODER_PARTS):
            values = tensor.detach().to("cpu", dtype).contiguous().view(torch.int16)  # the 16-bit patterns
            digest.update(f"{name}{tuple(tensor.shape)}".encode())
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def _state_dict(vae) -> dict[str, torch.Tensor]:
    """`vae`'s weights, also where accelerate's offload hooks (a pipeline's `enable_sequential_cpu_offload`) left
    only meta tensors on the model and keep the values in the hooks."""
    if not any(tensor.is_meta for tensor in vae.state_dict().values()):
        return vae.state_dict()
    from accelerate.utils.modeling import get_state_dict_offloaded_model

    return get_state_dict_offloaded_model(vae)
