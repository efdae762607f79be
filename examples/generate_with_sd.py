"""Generate an image with a Stable Diffusion 1.x/2.x or SDXL pipeline: a CustomVAE as its VAE, or for live previews.

    python examples/generate_with_sd.py --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 --vae my-vae \
        --prompt "a photo of a dog" --height 512 --width 768 --output dog.png
    python examples/generate_with_sd.py --pipeline ... --vae my-vae --prompt "a watercolour of a dog" \
        --image dog.png --strength 0.6 --output watercolour.png
    python examples/generate_with_sd.py --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \
        --preview_vae sd-tiny-vae --preview_every 5 --preview_gif --prompt "a photo of a dog" --output dog.png

The pipeline class (SD or SDXL) comes from the pipeline's model_index.json. --vae replaces its VAE (a CustomVAE, or
a diffusers AutoencoderKL); without it the pipeline keeps its own. A pretrained UNet only denoises the latent space
of the VAE it was trained with: with a VAE trained from scratch it makes noise-like images, and the script warns (see
the README, "Stable Diffusion").

--preview_vae decodes the latents of every --preview_every steps with a small VAE (one distilled from the pipeline's
VAE) into PNG frames, in --preview_dir (defaults to the output's name with "-previews"); --preview_gif also assembles
them into previews.gif there. The pipeline's VAE still decodes the final image.
"""

import argparse
from pathlib import Path

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

from diffusers_custom_vae.cli import checked, one_line_errors
from diffusers_custom_vae.images import load_image
from diffusers_custom_vae.loading import load_vae
from diffusers_custom_vae.pipelines import PIPELINE_SIZE_MULTIPLE, swap_vae
from diffusers_custom_vae.previews import LivePreviews

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
PREVIEW_OPTIONS = {"preview_every": None, "preview_dir": None, "preview_gif": False}  # their defaults
SIZE = checked(
    int, lambda n: n > 0 and n % PIPELINE_SIZE_MULTIPLE == 0, f"a positive multiple of {PIPELINE_SIZE_MULTIPLE}"
)
AT_LEAST_1 = checked(int, lambda n: n >= 1, "at least 1")


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="SD or SDXL pipeline: a folder or Hub repo id.")
    parser.add_argument("--vae", default=None, help="A VAE folder or Hub repo id; else the pipeline's VAE.")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--image", default=None, help="Initial image: image-to-image instead of text-to-image.")
    parser.add_argument(
        "--strength",
        type=checked(float, lambda x: 0 < x <= 1, "a number in (0, 1]"),
        default=None,
        help="How much to change --image, in (0, 1] (0.6).",
    )
    parser.add_argument("--height", type=SIZE, default=None, help="Pixels; defaults to the pipeline's (or --image's).")
    parser.add_argument("--width", type=SIZE, default=None, help="Pixels; defaults to the pipeline's (or --image's).")
    parser.add_argument("--steps", type=AT_LEAST_1, default=30, help="Denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="Defaults to the pipeline's.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="float16 halves GPU memory.")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--output",
        type=checked(Path, lambda path: path.suffix.lower() == ".png", "a .png file"),
        required=True,
        help="PNG file to write.",
    )
    previews = parser.add_argument_group("live previews")
    previews.add_argument(
        "--preview_vae", default=None, help="A small VAE in the pipeline's latent space (a folder or Hub repo id)."
    )
    previews.add_argument(
        "--preview_every", type=AT_LEAST_1, default=None, help="Steps between frames (1); the last too."
    )
    previews.add_argument(
        "--preview_dir",
        type=checked(Path, lambda path: path.is_dir() or not path.exists(), "a folder"),
        default=None,
        help="Folder of the frames (defaults to <output>-previews).",
    )
    previews.add_argument("--preview_gif", action="store_true", help="Also write previews.gif in --preview_dir.")
    args = parser.parse_args(argv)

    if args.image is None and args.strength is not None:
        parser.error("--strength applies to image-to-image: give --image too.")
    given = [f"--{name}" for name, default in PREVIEW_OPTIONS.items() if getattr(args, name) is not default]
    if args.preview_vae is None and given:
        parser.error(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to live previews: give --preview_vae too."
        )
    return parser, args


def main(argv=None) -> Path:
    parser, args = parse_args(argv)
    with one_line_errors(parser):  # a bad --image, VAE or pipeline: one line, exit status 2, nothing written
        return generate(args)


def generate(args: argparse.Namespace) -> Path:
    init_image = None if args.image is None else load_image(args.image)
    if init_image is not None and (args.height or args.width):
        init_image = init_image.resize((args.width or init_image.width, args.height or init_image.height))
    # The small downloads first: a bad --vae or --preview_vae fails before the pipeline's gigabytes. The preview VAE
    # stays float32, whatever --dtype: it is small, and safe from overflow.
    vae = None if args.vae is None else load_vae(args.vae)
    preview_vae = None if args.preview_vae is None else load_vae(args.preview_vae)
    pipeline_class = AutoPipelineForText2Image if init_image is None else AutoPipelineForImage2Image
    pipe = pipeline_class.from_pretrained(args.pipeline, torch_dtype=DTYPES[args.dtype])
    if vae is not None:
        swap_vae(pipe, vae)
    pipe.to(args.device)
    previews = None
    if preview_vae is not None:
        preview_dir = args.preview_dir or args.output.with_name(f"{args.output.stem}-previews")
        previews = LivePreviews(pipe, preview_vae, preview_dir, every=args.preview_every or 1)

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

    args.output.parent.mkdir(parents=True, exist_ok=True)
    image.save(args.output, format="PNG")
    print(f"Wrote {args.output} ({image.width}x{image.height}).")
    if previews is not None:
        print(f"Wrote {len(previews.frames)} preview frames to {previews.output_dir}.")
        if args.preview_gif:
            print(f"Wrote {previews.save_gif()}.")
    return args.output


if __name__ == "__main__":
    main()
