"""Compare VAEs on held-out images: PSNR, SSIM and MS-SSIM, and a grid of their reconstructions.

    python examples/evaluate_vae.py --vae outputs/custom-vae --vae user/other-vae --output comparison.png
    python examples/evaluate_vae.py --vae dog-vae --train_data_dir ./data/dogs --resolution 256 --output dogs.png

The images are the held-out split the trainer uses for the same data (by default, the two test photos embedded in
scikit-image and scikit-learn), so a model trained on that data is measured on images it never saw. CustomVAE and
diffusers AutoencoderKL folders or Hub ids both work.
"""

import argparse

from diffusers_custom_vae.cli import one_line_errors
from diffusers_custom_vae.data import load_data
from diffusers_custom_vae.evaluation import common_crop, comparison_grid, evaluate_vae
from diffusers_custom_vae.loading import load_vae
from diffusers_custom_vae.modeling_custom_vae import downsample_factor_of


def main(argv=None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", action="append", required=True, help="a VAE folder or Hub id; repeat to compare")
    parser.add_argument("--train_data_dir", default=None, help="a folder of images (its held-out files are used)")
    parser.add_argument("--dataset_name", default=None, help="a Hugging Face dataset (its test split is used)")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--resolution", type=int, default=256, help="largest side of the (square) grid images")
    parser.add_argument("--output", default="comparison.png", help="the grid: originals above each VAE's row")
    args = parser.parse_args(argv)
    with one_line_errors(parser):
        return compare(args)


def compare(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    vaes = [load_vae(name).eval() for name in args.vae]
    factor = max(downsample_factor_of(vae) for vae in vaes)  # every VAE takes the test images as they are
    data = load_data(
        train_data_dir=args.train_data_dir,
        dataset_name=args.dataset_name,
        image_column=args.image_column,
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
