"""Putting a VAE into a Stable Diffusion pipeline, and knowing whether its UNet can denoise that VAE's latents.

A pipeline reads `vae_scale_factor` and builds its image processors from the VAE once, in `__init__`; a plain
`pipe.vae = vae` leaves them stale, never casts dtype and leaves model offload hooks on the old VAE. `swap_vae`
does all of it, and refuses a VAE the pipeline cannot use.

A diffusion model denoises latents of one latent space: the one of the VAE it was trained with. `swap_vae` warns
unless the new VAE is known to share the pipeline VAE's space (see `latent_spaces`).
"""

import inspect
import json
import os
import warnings

import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.models.modeling_utils import ModelMixin

from .latent_spaces import LatentSpaceWarning, describe_latent_space, shares_latent_space
from .modeling_custom_vae import CustomVAE, downsample_factor_of

# Stable Diffusion and SDXL pipelines check only that height and width are multiples of 8 before dividing them by
# `vae_scale_factor`: a VAE that downsamples more would silently return images of another size.
PIPELINE_SIZE_MULTIPLE = 8


def swap_vae(pipe, vae):
    r"""
    Put `vae` into a Stable Diffusion pipeline and refresh everything the pipeline derived from its old VAE.

    Works for the Stable Diffusion 1.x/2.x and SDXL pipelines (text-to-image, image-to-image, inpainting), however they
    were made (`from_pretrained`, `from_pipe`, by hand). It:

    - refuses a VAE whose latent channels differ from the ones the UNet denoises, or whose downsampling the pipeline
      cannot use (more than 8x: the pipelines accept any multiple of 8 as height and width);
    - warns ([`LatentSpaceWarning`]) when the VAE's latent space is not known to be the one of the pipeline's VAE
      (see [`shares_latent_space`]): a UNet trained in another latent space produces noise-like images;
    - registers `vae` as the pipeline's `vae` component (so `save_pretrained` saves it);
    - moves it to the UNet's device and dtype; a [`CustomVAE`] with `force_upcast=True` stays in float32 (it casts
      latents and images to and from its own dtype, so it serves a float16 or bfloat16 UNet);
    - refreshes `vae_scale_factor` and the image processors (`image_processor`, `mask_processor`) built from it,
      keeping their other settings;
    - hooks the new VAE into model CPU offload (or sequential CPU offload) when the pipeline had it enabled.

    Args:
        pipe (`DiffusionPipeline`): A pipeline with `unet` and `vae` components. It is changed in place.
        vae (`ModelMixin`): The new VAE, e.g. a [`CustomVAE`] or an [`AutoencoderKL`].

    Returns:
        `DiffusionPipeline`: `pipe`, for chaining.
    """
    _check_compatible(pipe, vae)
    _warn_if_latent_space_differs(pipe, vae)

    # Offload hooks live on the components: take them off the old VAE and put them back on all, new VAE included.
    reinstall_offload = _installed_offload(pipe)
    if reinstall_offload is not None:
        pipe.remove_all_hooks()

    keep_float32 = isinstance(vae, CustomVAE) and vae.config.force_upcast
    dtype = torch.float32 if keep_float32 else pipe.unet.dtype
    vae.to(pipe.unet.device)
    if vae.dtype != dtype:  # diffusers logs a warning on every cast, even a needless one
        vae.to(dtype=dtype)
    pipe.register_modules(vae=vae)
    _refresh_scale_factor(pipe, downsample_factor_of(vae))

    if reinstall_offload is not None:
        reinstall_offload(device=pipe._offload_device)
    return pipe


def is_vae(value) -> bool:
    """Whether `value` is a VAE a pipeline can use: a diffusers model with `encode` and `decode`."""
    return (
        isinstance(value, ModelMixin)
        and callable(getattr(value, "encode", None))
        and callable(getattr(value, "decode", None))
    )


def describe_argument(value) -> str:
    """What a wrong argument is, in words: "None", "the str 'x'", "a UNet2DConditionModel"."""
    if value is None:
        return "None"
    return f"the str {value!r}" if isinstance(value, str) else f"a {type(value).__name__}"


def _check_compatible(pipe, vae):
    # Arguments of the wrong kind would fail deep inside (AttributeError on `components` or `config`), or as a
    # ValueError about a missing config field.
    if not isinstance(pipe, DiffusionPipeline):
        hint = " (the pipeline comes first: swap_vae(pipe, vae))" if is_vae(pipe) else ""
        hint = " (load it first, e.g. with DiffusionPipeline.from_pretrained)" if isinstance(pipe, str) else hint
        raise TypeError(f"swap_vae expected a diffusers pipeline as `pipe`, got {describe_argument(pipe)}{hint}.")
    if not is_vae(vae):
        hint = f" (load it first: CustomVAE.from_pretrained({vae!r}))" if isinstance(vae, str) else ""
        raise TypeError(
            "swap_vae expected a VAE (a diffusers model with `encode` and `decode`, such as a CustomVAE or an "
            f"AutoencoderKL) as `vae`, got {describe_argument(vae)}{hint}."
        )
    pipeline, vae_name = type(pipe).__name__, type(vae).__name__
    unet = getattr(pipe, "unet", None)
    if unet is None or "vae" not in pipe.components:
        raise ValueError(
            f"swap_vae works on pipelines with a `unet` and a `vae` (Stable Diffusion 1.x/2.x, SDXL); {pipeline} "
            f"has the components {sorted(pipe.components)}."
        )
    missing = [field for field in ("latent_channels", "block_out_channels") if field not in vae.config]
    if missing:
        raise ValueError(
            f"{pipeline} reads `latent_channels` and `block_out_channels` from its VAE's config, but the config of "
            f"this {vae_name} has no {' or '.join(missing)}."
        )

    latent_channels, unet_channels = vae.config.latent_channels, unet.config.out_channels
    if latent_channels != unet_channels:
        inputs = unet.config.in_channels
        inputs_note = ""
        if inputs == 2 * unet_channels + 1:  # inpainting: noisy latents + masked-image latents + mask
            inputs_note = f" (its {inputs} input channels are {unet_channels} + {unet_channels} + 1: noisy latents, "
            inputs_note += "masked-image latents and the mask)"
        raise ValueError(
            f"This {vae_name} has {latent_channels} latent channels, but the UNet of {pipeline} denoises "
            f"{unet_channels}-channel latents{inputs_note}. Use a VAE with latent_channels={unet_channels}, or a "
            "UNet trained on this VAE's latents."
        )

    factor = downsample_factor_of(vae)
    if PIPELINE_SIZE_MULTIPLE % factor:
        example = factor + PIPELINE_SIZE_MULTIPLE
        raise ValueError(
            f"This {vae_name} downsamples {factor}x ({len(vae.config.block_out_channels)} entries in "
            f"block_out_channels), but {pipeline} accepts any height and width that are multiples of "
            f"{PIPELINE_SIZE_MULTIPLE}, so most sizes would come out wrong (a {example}x{example} request would "
            f"return {factor}x{factor}). Use a VAE that downsamples at most {PIPELINE_SIZE_MULTIPLE}x."
        )


def _warn_if_latent_space_differs(pipe, vae):
    if shares_latent_space(vae, pipe.vae):
        return
    warnings.warn(
        f"The UNet of {type(pipe).__name__} expects latents of {describe_latent_space(pipe.vae)} (its original "
        f"VAE's); the new {type(vae).__name__} encodes into {describe_latent_space(vae)}. A VAE trained from scratch "
        "has a latent space of its own, and a UNet only denoises latents of the space it was trained in: expect "
        "noise-like images, unless this UNet was trained on this VAE's latents. Use such a UNet, or a VAE aligned to "
        "the UNet's latent space (distilled from its VAE with `--teacher_vae`); VAEs that share a space carry its "
        "name in their configs (`latent_space`).",
        LatentSpaceWarning,
        stacklevel=3,
    )


def _installed_offload(pipe):
    """The pipeline method that installed accelerate's offload hooks, to call again after the swap; or `None`."""
    if getattr(pipe, "_all_hooks", None):
        return pipe.enable_model_cpu_offload
    if hasattr(pipe.unet, "_hf_hook") and getattr(pipe, "_offload_device", None) is not None:
        return pipe.enable_sequential_cpu_offload
    return None


def _refresh_scale_factor(pipe, factor: int):
    """Sets `vae_scale_factor` and rebuilds each image processor built with the old one, other settings kept."""
    old_factor = pipe.vae_scale_factor
    processors = {name: value for name, value in vars(pipe).items() if isinstance(value, VaeImageProcessor)}
    for name, processor in processors.items():
        if processor.config.vae_scale_factor == old_factor:
            setattr(pipe, name, type(processor).from_config(processor.config, vae_scale_factor=factor))
    pipe.vae_scale_factor = factor


def save_pipeline(pipe, save_directory: str | os.PathLike, **save_pretrained_kwargs):
    r"""
    Save a pipeline whose VAE is a `CustomVAE` so that diffusers loads it where the diffusers_custom_vae package is not
    installed, from the folder or from a Hub repo it is uploaded to (e.g. by [`push_pipeline_to_hub`]):

    ```python
    pipe = DiffusionPipeline.from_pretrained("user/dog-diffusion", trust_remote_code=True)
    ```

    It is `pipe.save_pretrained`, then `model_index.json` names the VAE's class by the modeling file saved in the
    VAE's folder (`["modeling_custom_vae", "CustomVAE"]`), which is how diffusers finds a component's remote code.
    Saving again into the folder writes what is saved now: where an earlier save left a CustomVAE's modeling file
    and the component is another class now, that file (and no other) is removed.
    With the package imported, such a folder loads without `trust_remote_code` and runs none of the folder's code
    (importing the package registers `CustomVAE` under that name, which diffusers looks up first); without the
    package, `trust_remote_code=True` runs the folder's copy of the model file. `pipe.save_pretrained` alone records
    the package's module path instead: the folder then loads only after `import diffusers_custom_vae`, and not by
    Hub repo id (diffusers issue 6563).

    Args:
        pipe (`DiffusionPipeline`): The pipeline.
        save_directory (`str` or `os.PathLike`): The folder to write (created if needed).
        **save_pretrained_kwargs: Passed to `pipe.save_pretrained` (`safe_serialization`, `variant`,
            `max_shard_size`); to upload, use [`push_pipeline_to_hub`].
    """
    if not isinstance(pipe, DiffusionPipeline):  # a VAE's save_pretrained would write its folder, then fail here
        raise TypeError(f"save_pipeline expected a diffusers pipeline as `pipe`, got {describe_argument(pipe)}.")
    if save_pretrained_kwargs.get("push_to_hub"):
        raise ValueError("save_pipeline writes a folder; upload with diffusers_custom_vae.push_pipeline_to_hub.")
    module_file = os.path.basename(inspect.getfile(CustomVAE))  # what CustomVAE.save_config writes beside config.json
    custom = {name for name, component in pipe.components.items() if isinstance(component, CustomVAE)}
    # A component that was a CustomVAE in an earlier save, and is another class now, leaves a stale modeling file.
    stale = [name for name in pipe.components if name not in custom and _saved_custom_vae(save_directory, name)]
    pipe.save_pretrained(save_directory, **save_pretrained_kwargs)
    for name in stale:
        os.remove(os.path.join(save_directory, name, module_file))
    index_file = os.path.join(save_directory, "model_index.json")
    with open(index_file, encoding="utf-8") as file:
        index = json.load(file)
    for name in custom:
        index[name] = [os.path.splitext(module_file)[0], index[name][1]]
    with open(index_file, "w", encoding="utf-8") as file:
        file.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _saved_custom_vae(save_directory, name: str) -> bool:
    """Whether `save_directory/name` holds a CustomVAE as this package saves one: its config and its modeling file."""
    folder = os.path.join(save_directory, name)
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as file:
            class_name = json.load(file).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return False
    module_file = os.path.basename(inspect.getfile(CustomVAE))
    return class_name == CustomVAE.__name__ and os.path.isfile(os.path.join(folder, module_file))
