"""Live previews: the intermediate latents of a Stable Diffusion run, decoded by a small VAE as the run goes.

A VAE aligned to the UNet's latent space (distilled from the pipeline's VAE, as TAESD is from SD's) decodes the
latents of every step at a fraction of the cost of the pipeline's own VAE. `LivePreviews` is a step callback for
diffusers pipelines (`callback_on_step_end`): it writes one PNG frame per preview step and can assemble them into an
animated GIF. It only reads the latents: the pipeline's images are the same with and without it.
"""

import os
import warnings
from pathlib import Path

import torch
from diffusers.utils import make_image_grid
from PIL import Image

from .images import tensor_to_pil
from .latent_spaces import LatentSpaceWarning, describe_latent_space, shares_latent_space
from .pipelines import describe_argument, is_vae


class LivePreviews:
    r"""
    A step callback that decodes a pipeline's intermediate latents with a preview VAE and writes them as PNG frames.

    ```python
    previews = LivePreviews(pipe, CustomVAE.from_pretrained("user/sd-tiny-vae"), "previews", every=5)
    image = pipe("a photo of a dog", callback_on_step_end=previews).images[0]  # the pipeline's VAE decodes this
    previews.save_gif("previews/dog.gif")
    ```

    Works with the Stable Diffusion 1.x/2.x and SDXL pipelines (text-to-image, image-to-image, inpainting), with
    classifier-free guidance (the latents the callback sees are the batch's, one per image) and with
    [`~diffusers.callbacks.MultiPipelineCallbacks`]. Each frame is `step-NNN.png` (NNN counts the steps run, from 1):
    the images of the batch side by side, decoded at the preview VAE's resolution. The latents are divided by the
    preview VAE's `scaling_factor` (and its `shift_factor` added, when set, as SD3 and Flux pipelines do): a VAE
    distilled from the pipeline's VAE keeps that VAE's factors. Frames of the last step are written whatever `every`
    is. The folder is created with the first frame; a run overwrites the frames of an earlier one of the same names.

    The preview VAE decodes in its own dtype, on the device of the latents (it is moved there at the first step).

    Args:
        pipe (`DiffusionPipeline`): The pipeline whose runs to preview: it has a `unet` and a `vae`.
        vae (`ModelMixin`): The preview VAE, e.g. a [`CustomVAE`] distilled from the pipeline's VAE (diffusers'
            [`AutoencoderTiny`], TAESD's class, works too). Refused with a `TypeError` when it is not a VAE, and a
            `ValueError` when its latent channels differ from the UNet's. A [`LatentSpaceWarning`] says when it is
            not known to share the latent space of the pipeline's VAE (see [`shares_latent_space`]): its previews
            would then show noise-like images.
        output_dir (`str` or `os.PathLike`): The folder of the frames.
        every (`int`, *optional*, defaults to 1): Write a frame every `every` steps (and at the last step).

    Attributes:
        frames (`list[Path]`): The frames written by the latest run, in order.
        skipped (`list[int]`): The steps of the latest run whose frames were skipped: the preview VAE's decode was
            not finite (a [`RuntimeWarning`] says so once per run).
    """

    tensor_inputs = ["latents"]  # what MultiPipelineCallbacks asks each callback; "latents" is the pipelines' default

    def __init__(self, pipe, vae, output_dir: str | os.PathLike, every: int = 1):
        _check_preview_vae(pipe, vae)
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"`every` must be a whole number of steps, at least 1, got {every!r}.")
        if vae is not pipe.vae and not shares_latent_space(vae, pipe.vae):
            warnings.warn(
                f"The preview {type(vae).__name__} decodes latents of {describe_latent_space(vae)}, but the UNet of "
                f"{type(pipe).__name__} denoises latents of {describe_latent_space(pipe.vae)} (its VAE's): expect "
                "noise-like previews, unless the two spaces are the same. A preview VAE distilled from the "
                "pipeline's VAE (`--teacher_vae`) records its space in its config (`latent_space`).",
                LatentSpaceWarning,
                stacklevel=2,
            )
        self.vae = vae
        self.output_dir = Path(output_dir)
        self.every = every
        self.frames: list[Path] = []
        self.skipped: list[int] = []

    def __call__(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        """Called by the pipeline after each step (`step` counts from 0); returns `callback_kwargs` untouched."""
        if "latents" not in callback_kwargs:
            raise ValueError(
                "LivePreviews decodes the latents, but the pipeline passed only "
                f"{sorted(callback_kwargs)}: include 'latents' in callback_on_step_end_tensor_inputs."
            )
        if step == 0:  # a new run
            self.frames, self.skipped = [], []
        last_step = getattr(pipe, "num_timesteps", None)
        if (step + 1) % self.every == 0 or (last_step is not None and step == last_step - 1):
            frame = self._write_frame(callback_kwargs["latents"], step + 1)
            if frame is not None:
                self.frames.append(frame)
        return callback_kwargs

    @torch.no_grad()
    def _write_frame(self, latents: torch.Tensor, steps_run: int) -> Path | None:
        """Writes the frame of `latents`; `None` when the preview VAE's decode is not finite (e.g. a float16 VAE
        that overflows): previews are extras, so the frame is skipped, with one warning per run."""
        # (B, C, h, w) scaled latents -> (B, 3, H, W) images in [-1, 1] -> one row of B images
        if latents.device != self.vae.device and not hasattr(self.vae, "_hf_hook"):  # offload hooks move it already
            self.vae.to(latents.device)
        config = self.vae.config
        unscaled = latents.to(self.vae.dtype) / config.get("scaling_factor", 1.0)  # a new tensor: latents untouched
        if config.get("shift_factor") is not None:
            unscaled = unscaled + config.shift_factor
        decoded = self.vae.decode(unscaled, return_dict=False)[0]
        if not torch.isfinite(decoded).all():
            if not self.skipped:
                warnings.warn(
                    f"The preview {type(self.vae).__name__} decoded the latents of step {steps_run} to values that "
                    f"are not finite (NaN or infinite; in {self.vae.dtype}, does it overflow?): that frame and any "
                    "other such frame of this run are skipped; the pipeline's own images are not affected.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            self.skipped.append(steps_run)
            return None
        images = tensor_to_pil(decoded)
        frame = make_image_grid(images, rows=1, cols=len(images))

        self.output_dir.mkdir(parents=True, exist_ok=True)
        path = self.output_dir / f"step-{steps_run:03d}.png"
        frame.save(path, format="PNG")
        return path

    def save_gif(
        self, path: str | os.PathLike | None = None, frame_duration: int = 100, last_frame_duration: int = 1000
    ) -> Path:
        r"""
        Assemble the frames of the latest run into an animated GIF that loops.

        Args:
            path (`str` or `os.PathLike`, *optional*): The GIF to write; defaults to `previews.gif` in the frames'
                folder.
            frame_duration (`int`, *optional*, defaults to 100): Milliseconds each frame shows.
            last_frame_duration (`int`, *optional*, defaults to 1000): Milliseconds the last frame shows, before the
                loop starts again.

        Returns:
            `Path`: the GIF written.
        """
        if not self.frames:
            raise ValueError(
                "No preview frames to make a GIF of: run the pipeline with callback_on_step_end=previews first."
            )
        path = self.output_dir / "previews.gif" if path is None else Path(path)
        if path.suffix.lower() != ".gif":
            raise ValueError(f"save_gif writes a .gif file, got {os.fspath(path)!r}.")
        frames = []
        for frame_path in self.frames:
            with Image.open(frame_path) as frame:
                frames.append(frame.convert("RGB"))
        durations = [frame_duration] * (len(frames) - 1) + [last_frame_duration]
        path.parent.mkdir(parents=True, exist_ok=True)
        frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
        return path


def _check_preview_vae(pipe, vae):
    if not is_vae(vae):
        raise TypeError(
            "LivePreviews expected a VAE (a diffusers model with `encode` and `decode`, such as a CustomVAE or an "
            f"AutoencoderKL) as the preview VAE, got {describe_argument(vae)}."
        )
    unet = getattr(pipe, "unet", None)
    if unet is None or getattr(pipe, "vae", None) is None:
        raise ValueError(
            "LivePreviews previews pipelines with a `unet` and a `vae` (Stable Diffusion 1.x/2.x, SDXL); got "
            f"{describe_argument(pipe)}."
        )
    latent_channels, unet_channels = vae.config.get("latent_channels"), unet.config.out_channels
    if latent_channels != unet_channels:
        has = "no latent_channels in its config" if latent_channels is None else f"{latent_channels} latent channels"
        raise ValueError(
            f"The preview {type(vae).__name__} has {has}, but the UNet of "
            f"{type(pipe).__name__} denoises {unet_channels}-channel latents: use a preview VAE with "
            f"latent_channels={unet_channels}."
        )
