"""Generate images with a class-conditional pipeline trained by train_latent_diffusion.py (a DiTPipeline folder or Hub
id), one image or a grid.

    python examples/generate.py --pipeline outputs/custom-dit --class_name astronaut --num_images 4 --output a.png
    python examples/generate.py --pipeline pets-dit --class_name dog --class_name cat --num_images 8 --output pets.png
"""

import argparse

from diffusers_custom_vae.cli import one_line_errors
from diffusers_custom_vae.generation import generate

PARSER = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
PARSER.add_argument("--pipeline", required=True, help="a DiTPipeline folder or Hub id")
PARSER.add_argument("--class_name", action="append", help="a class to generate (repeatable); default: every class")
PARSER.add_argument("--class_id", type=int, action="append", help="a class index instead of a name (repeatable)")
PARSER.add_argument("--num_images", type=int, default=4, help="images per class")
PARSER.add_argument("--guidance_scale", type=float, default=4.0, help="classifier-free guidance (1: none)")
PARSER.add_argument("--num_inference_steps", type=int, default=25, help="denoising steps")
PARSER.add_argument("--seed", type=int, default=0, help="same seed, same images")
PARSER.add_argument("--output", default="samples.png", help="the image (one) or grid (several: a row per class)")
PARSER.add_argument("--device", default=None, help="cuda, mps or cpu (default: cuda when there is one)")


def main(argv: list[str] | None = None):
    args = PARSER.parse_args(argv)
    with one_line_errors(PARSER):
        image = generate(
            args.pipeline,
            class_names=args.class_name,
            class_ids=args.class_id,
            num_images=args.num_images,
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.num_inference_steps,
            seed=args.seed,
            device=args.device,
        )
        image.save(args.output)
    print(f"Saved {args.output}")


if __name__ == "__main__":
    main()
