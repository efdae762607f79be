"""Generate an image with a Stable Diffusion 1.x/2.x or SDXL pipeline whose VAE is a CustomVAE.

    python examples/generate_with_sd.py --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 --vae my-vae \
        --prompt "a photo of a dog" --height 512 --width 768 --output dog.png
    python examples/generate_with_sd.py --pipeline ... --vae my-vae --prompt "a watercolour of a dog" \
        --image dog.png --strength 0.6 --output watercolour.png

The pipeline class (SD or SDXL) comes from the pipeline's model_index.json. A pretrained UNet only denoises the
latent space of the VAE it was trained with: with a VAE trained from scratch it makes noise-like images, and the
script warns (see the README, "Stable Diffusion").
"""

import argparse
from pathlib import Path

import torch
from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.images import load_image
from diffusers_custom_vae.pipelines import PIPELINE_SIZE_MULTIPLE, swap_vae

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", required=True, help="SD or SDXL pipeline: a folder or Hub repo id.")
    parser.add_argument("--vae", required=True, help="CustomVAE: a folder or Hub repo id.")
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
    if Path(args.output).suffix.lower() != ".png":
        parser.error(f"--output must be a .png file, got {args.output!r}.")
    return parser, args


def main(argv=None) -> Path:
    parser, args = parse_args(argv)
    init_image = None
    if args.image is not None:
        try:
            init_image = load_image(args.image)
        except ValueError as error:
            parser.error(f"--image: {error}")
        if args.height or args.width:
            init_image = init_image.resize((args.width or init_image.width, args.height or init_image.height))

    try:  # the small download first: a bad --vae fails before the pipeline's gigabytes
        vae = CustomVAE.from_pretrained(args.vae)
    except (OSError, ValueError) as error:
        parser.error(f"--vae {args.vae!r} is not a CustomVAE I can load: {error}")
    pipeline_class = AutoPipelineForText2Image if init_image is None else AutoPipelineForImage2Image
    try:
        pipe = pipeline_class.from_pretrained(args.pipeline, torch_dtype=DTYPES[args.dtype])
    except (OSError, ValueError) as error:
        parser.error(f"--pipeline {args.pipeline!r} is not a Stable Diffusion pipeline I can load: {error}")
    try:
        pipe = swap_vae(pipe, vae).to(args.device)
    except ValueError as error:
        parser.error(f"--vae {args.vae!r} does not fit --pipeline {args.pipeline!r}: {error}")

    options = dict(negative_prompt=args.negative_prompt, num_inference_steps=args.steps)
    if args.guidance_scale is not None:
        options["guidance_scale"] = args.guidance_scale
    if init_image is None:
        options.update(height=args.height, width=args.width)
    else:
        options.update(image=init_image, strength=0.6 if args.strength is None else args.strength)
    generator = torch.Generator(args.device).manual_seed(args.seed)
    image = pipe(args.prompt, generator=generator, **options).images[0]  # the pipeline shows a progress bar

    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    image.save(output, format="PNG")
    print(f"Wrote {output} ({image.width}x{image.height}).")
    return output


if __name__ == "__main__":
    main()
