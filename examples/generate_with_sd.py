"""Generate an image with a Stable Diffusion 1.x/2.x or SDXL pipeline: a CustomVAE as its VAE, or for live previews.

    python examples/generate_with_sd.py --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 --vae my-vae \
        --prompt "a photo of a dog" --height 512 --width 768 --output dog.png
    python examples/generate_with_sd.py --pipeline ... --vae my-vae --prompt "a watercolour of a dog" \
        --image dog.png --strength 0.6 --output watercolour.png
    python examples/generate_with_sd.py --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --preview_vae sd-tiny-vae --preview_every 5 --preview_gif --prompt "a photo of a dog" --output dog.png

The pipeline class (SD or SDXL) comes from the pipeline's model_index.json. Without --vae the pipeline keeps its own
VAE. A pretrained UNet only denoises the latent space of the VAE it was trained with: with a VAE trained from scratch
it makes noise-like images, and the script warns (see the README, "Stable Diffusion").

--preview_vae decodes the latents of every --preview_every steps with a small VAE (one distilled from the pipeline's
VAE) into PNG frames, in --preview_dir (defaults to the output's name with "-previews"); --preview_gif also assembles
them into previews.gif there. The pipeline's VAE still decodes the final image.
"""

import argparse
from pathlib import Path

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.cli import one_line_errors
from diffusers_custom_vae.images import load_image
from diffusers_custom_vae.loading import load_vae
from diffusers_custom_vae.pipelines import PIPELINE_SIZE_MULTIPLE, swap_vae
from diffusers_custom_vae.previews import LivePreviews

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREVIEW_OPTIONS = {"preview_every": None, "preview_dir": None, "preview_gif": False}  # their defaults


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="SD or SDXL pipeline: a folder or Hub repo id.")
    parser.add_argument("--vae", default=None, help="CustomVAE: a folder or Hub repo id; else the pipeline's VAE.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--image", default=None, help="Initial image: image-to-image instead of text-to-image.")
    parser.add_argument("--strength", type=float, default=None, help="How much to change --image, in (0, 1] (0.6).")
    parser.add_argument("--height", type=int, default=None, help="Pixels; defaults to the pipeline's (or --image's).")
    parser.add_argument("--width", type=int, default=None, help="Pixels; defaults to the pipeline's (or --image's).")
    parser.add_argument("--steps", type=int, default=30, help="Denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Defaults to the pipeline's.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="float16 halves GPU memory.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", required=True, help="PNG file to write.")
    previews = parser.add_argument_group("live previews")
    previews.add_argument(
        "--preview_vae", default=None, help="A small VAE in the pipeline's latent space (a folder or Hub repo id)."
    )
    previews.add_argument("--preview_every", type=int, default=None, help="Steps between frames (1); the last too.")
    previews.add_argument("--preview_dir", default=None, help="Folder of the frames (defaults to <output>-previews).")
    previews.add_argument("--preview_gif", action="store_true", help="Also write previews.gif in --preview_dir.")
    args = parser.parse_args(argv)

    for name in ("height", "width"):
        size = getattr(args, name)
        if size is not None and (size <= 0 or size % PIPELINE_SIZE_MULTIPLE):
            parser.error(
                f"--{name} must be a positive multiple of {PIPELINE_SIZE_MULTIPLE} (Stable Diffusion "
                f"pipelines and the VAE's downsampling require it), got {size}."
            )
    if args.image is None and args.strength is not None:
        parser.error("--strength applies to image-to-image: give --image too.")
    if args.strength is not None and not 0 < args.strength <= 1:
        parser.error(f"--strength must be in (0, 1], got {args.strength}.")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}.")
    output = Path(args.output)
    if output.suffix.lower() != ".png":
        parser.error(f"--output must be a .png file, got {args.output!r}.")

    if args.preview_vae is None:
        given = [f"--{name}" for name, default in PREVIEW_OPTIONS.items() if getattr(args, name) is not default]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            parser.error(f"{', '.join(given)} {verb} to live previews: give --preview_vae too.")
        return parser, args
    if args.preview_every is None:
        args.preview_every = 1
    if args.preview_every < 1:
        parser.error(f"--preview_every must be at least 1, got {args.preview_every}.")
    if args.preview_dir is None:
        args.preview_dir = str(output.with_name(f"{output.stem}-previews"))
    if Path(args.preview_dir).exists() and not Path(args.preview_dir).is_dir():
        parser.error(f"--preview_dir must be a folder, but {args.preview_dir!r} is a file.")
    return parser, args


def main(argv=None) -> Path:
    parser, args = parse_args(argv)
    with one_line_errors(parser):  # a bad --image, VAE or pipeline: one line, exit status 2, nothing written
        return generate(args)


def generate(args: argparse.Namespace) -> Path:
    init_image = None
    if args.image is not None:
        try:
            init_image = load_image(args.image)
        except ValueError as error:
            raise ValueError(f"--image: {error}") from error
        if args.height or args.width:
            init_image = init_image.resize((args.width or init_image.width, args.height or init_image.height))

    # The small downloads first: a bad --vae or --preview_vae fails before the pipeline's gigabytes.
    vae = preview_vae = None
    if args.vae is not None:
        try:
            vae = CustomVAE.from_pretrained(args.vae)
        except (OSError, ValueError) as error:
            raise ValueError(f"--vae {args.vae!r} is not a CustomVAE I can load: {error}") from error
    if args.preview_vae is not None:
        try:
            preview_vae = load_vae(args.preview_vae)  # float32, whatever --dtype: small, and safe from overflow
        except (OSError, ValueError) as error:
            raise ValueError(f"--preview_vae {args.preview_vae!r} is not a VAE I can load: {error}") from error
    pipeline_class = AutoPipelineForText2Image if init_image is None else AutoPipelineForImage2Image
    try:
        pipe = pipeline_class.from_pretrained(args.pipeline, torch_dtype=DTYPES[args.dtype])
    except (OSError, ValueError) as error:
        raise ValueError(
            f"--pipeline {args.pipeline!r} is not a Stable Diffusion pipeline I can load: {error}"
        ) from error
    if vae is not None:
        try:
            swap_vae(pipe, vae)
        except ValueError as error:
            raise ValueError(f"--vae {args.vae!r} does not fit --pipeline {args.pipeline!r}: {error}") from error
    pipe.to(args.device)
    previews = None
    if preview_vae is not None:
        try:
            previews = LivePreviews(pipe, preview_vae, args.preview_dir, every=args.preview_every)
        except ValueError as error:
            raise ValueError(
                f"--preview_vae {args.preview_vae!r} does not fit --pipeline {args.pipeline!r}: {error}"
            ) from error

    options = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps)
    if args.guidance_scale is not None:
        options["guidance_scale"] = args.guidance_scale
    if init_image is None:
        options.update(height=args.height, width=args.width)
    else:
        options.update(image=init_image, strength=0.6 if args.strength is None else args.strength)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    # The pipeline shows a progress bar; the previews write their frames quietly.
    image = pipe(args.prompt, generator=generator, callback_on_step_end=previews, **options).images[0]

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output, format="PNG")
    print(f"Wrote {output} ({image.width}x{image.height}).")
    if previews is not None:
        print(f"Wrote {len(previews.frames)} preview frames to {previews.output_dir}.")
        if args.preview_gif:
            print(f"Wrote {previews.save_gif()}.")
    return output


if __name__ == "__main__":
    main()
