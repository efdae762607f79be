"""Sampling from a class-conditional `DiTPipeline` trained by `training.LatentDiffusionObjective`, by class name."""

import os

import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from PIL import Image

from .images import image_grid, tensor_to_pil
from .loading import load_vae


def class_ids_of(pipe: DiTPipeline, class_names: list[str] | None = None, class_ids: list[int] | None = None):
    """The class indices to sample: those of `class_names` (`ValueError` listing the known names for an unknown one),
    or `class_ids` (each checked against the pipeline's classes), or every class of the pipeline."""
    known = dict(sorted(pipe.labels.items(), key=lambda item: item[1]))  # name -> index, in index order
    if class_names and class_ids:
        raise ValueError("Give class names or class ids, not both.")
    if class_names:
        unknown = [name for name in class_names if name not in known]
        if unknown:
            raise ValueError(f"Unknown class {unknown[0]!r}: this pipeline knows {', '.join(known) or 'no names'}.")
        return [known[name] for name in class_names]
    if class_ids:
        bad = [index for index in class_ids if index not in known.values()]
        if bad:
            raise ValueError(f"Unknown class id {bad[0]}: this pipeline's ids are {sorted(set(known.values()))}.")
        return list(class_ids)
    if not known:
        raise ValueError("This pipeline has no id2label in its model_index.json: give --class_id.")
    return sorted(set(known.values()))


def load_dit_pipeline(name_or_path: str | os.PathLike, **from_pretrained_kwargs) -> DiTPipeline:
    r"""
    Load a `DiTPipeline` saved by the latent diffusion trainer with this package's classes: its VAE through
    `loading.load_vae` (as strictly as every VAE here), so no code from the folder runs. (With the package imported,
    `DiTPipeline.from_pretrained` does the same; without it, it needs `trust_remote_code=True`, which runs the VAE's
    modeling file shipped in `vae/`.)

    Args:
        name_or_path (`str` or `os.PathLike`): The pipeline's folder or Hub id.
        **from_pretrained_kwargs: Passed to each component's `from_pretrained` (`cache_dir`, `revision`...).
    """
    index = DiTPipeline.load_config(name_or_path, **from_pretrained_kwargs)
    if index.get("_class_name") != "DiTPipeline":
        raise ValueError(f"{os.fspath(name_or_path)} holds a {index.get('_class_name')}, not a DiTPipeline.")
    return DiTPipeline(
        transformer=DiTTransformer2DModel.from_pretrained(
            name_or_path, subfolder="transformer", **from_pretrained_kwargs
        ),
        vae=load_vae(name_or_path, subfolder="vae", **from_pretrained_kwargs),
        scheduler=DDIMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **from_pretrained_kwargs),
        id2label=index.get("id2label"),
    )


@torch.no_grad()
def generate(
    pipeline: str | os.PathLike | DiTPipeline,
    class_names: list[str] | None = None,
    class_ids: list[int] | None = None,
    num_images: int = 4,
    guidance_scale: float = 4.0,
    num_inference_steps: int = 25,
    seed: int = 0,
    device: str | None = None,
) -> Image.Image:
    r"""
    Samples `num_images` images of each class from a class-conditional `DiTPipeline`.

    Args:
        pipeline (`str`, `os.PathLike` or `DiTPipeline`): The pipeline, or its folder or Hub id.
        class_names (`list[str]`, *optional*): Classes by name (the pipeline's `id2label`).
        class_ids (`list[int]`, *optional*): Classes by index, instead of names. Neither: every class.
        num_images (`int`, *optional*, defaults to 4): Images per class.
        guidance_scale (`float`, *optional*, defaults to 4.0): Classifier-free guidance (1: none).
        num_inference_steps (`int`, *optional*, defaults to 25): Denoising steps.
        seed (`int`, *optional*, defaults to 0): Seed of the initial noise: same seed, same images.
        device (`str`, *optional*): Where to run (default: CUDA when available, else the CPU).

    Returns:
        `PIL.Image.Image`: the image when one is asked for, else a grid with one row per class.
    """
    for name, value, lowest in (("num_images", num_images, 1), ("num_inference_steps", num_inference_steps, 1)):
        if not value >= lowest:
            raise ValueError(f"--{name} must be at least {lowest}, got {value}.")
    if not guidance_scale >= 1:
        raise ValueError(f"--guidance_scale must be at least 1, got {guidance_scale}.")
    pipe = pipeline if isinstance(pipeline, DiTPipeline) else load_dit_pipeline(pipeline)
    labels = class_ids_of(pipe, class_names, class_ids)
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    generator = torch.Generator(pipe.device).manual_seed(seed)
    images = pipe(
        [label for label in labels for _ in range(num_images)],
        guidance_scale=guidance_scale,
        num_inference_steps=num_inference_steps,
        generator=generator,
        output_type="pt",
    ).images.cpu()
    images = images * 2 - 1  # [0, 1] -> [-1, 1], as the package's images are
    return tensor_to_pil(images[0]) if len(images) == 1 else image_grid(list(images.split(num_images)))
