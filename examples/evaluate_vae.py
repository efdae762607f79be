"""Compare VAEs on held-out images: PSNR, SSIM and MS-SSIM, and a grid of their reconstructions.

    python examples/evaluate_vae.py --vae outputs/custom-vae --vae user/other-vae --output comparison.png
    python examples/evaluate_vae.py --vae dog-vae --train_data_dir ./data/dogs --resolution 256 --output dogs.png

The images are the ones the VAEs' training held out: a VAE folder written by the trainer records its data (and the
seed that drew a dataset's held-out rows) in its training_config.json, so a trained model is measured on images it
never saw, and its held-out PSNR is the one in its metrics.json. Data flags choose other data; without them or a
record, the two test photos embedded in scikit-image and scikit-learn. CustomVAE and diffusers AutoencoderKL folders
or Hub ids both work.
"""

import argparse

from diffusers_custom_vae.cli import one_line_errors
from diffusers_custom_vae.data import load_data
from diffusers_custom_vae.evaluation import common_crop, comparison_grid, evaluate_vae, held_out_data
from diffusers_custom_vae.loading import load_vae
from diffusers_custom_vae.modeling_custom_vae import downsample_factor_of


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", action="append", required=True, help="a VAE folder or Hub id; repeat to compare")
    parser.add_argument("--train_data_dir", default=None, help="a folder of images (its held-out files are used)")
    parser.add_argument(
        "--dataset_name", default=None, help="a Hugging Face dataset (its test split, else held-out rows)"
    )
    parser.add_argument("--dataset_config_name", default=None, help="the dataset's config name, if it has several")
    parser.add_argument("--image_column", default=None, help="the dataset column holding the images (image)")
    parser.add_argument("--streaming", action="store_true", default=None, help="stream --dataset_name")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of a dataset's held-out rows when it has no test split (0)"
    )
    parser.add_argument("--resolution", type=int, default=256, help="largest side of the (square) grid images")
    parser.add_argument("--output", default="comparison.png", help="the grid: originals above each VAE's row")
    args = parser.parse_args(argv)
    with one_line_errors(parser):
        return compare(args)


def compare(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    data_flags = ("train_data_dir", "dataset_name", "dataset_config_name", "image_column", "streaming", "seed")
    data_arguments = held_out_data(args.vae, **{name: getattr(args, name) for name in data_flags})
    vaes = [load_vae(name).eval() for name in args.vae]
    factor = max(downsample_factor_of(vae) for vae in vaes)  # every VAE takes the test images as they are
    data = load_data(
        **data_arguments,
        resolution=args.resolution // factor * factor or factor,  # the validation crops, unused here
        downsample_factor=factor,
    )
    results = {name: evaluate_vae(vae, data.test, desc=name) for name, vae in zip(args.vae, vaes)}
    comparison_grid(vaes, common_crop(data.test, max_side=args.resolution, multiple=factor)).save(args.output)

    print(f"\nHeld-out: {data.test_description}.\n\n| VAE | PSNR (dB) | SSIM | MS-SSIM |\n|---|---|---|---|")
    for name, metrics in results.items():
        print(f"| {name} | {metrics['psnr']:.2f} | {metrics['ssim']:.4f} | {metrics['ms_ssim']:.4f} |")
    print(f"\nReconstructions: {args.output} (originals on top, then one row per VAE in the order above).")
    return results


if __name__ == "__main__":
    main()
