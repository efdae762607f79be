"""The main job side by side: CustomVAE and diffusers' AutoencoderKL of equal width, trained by the same trainer with
the same budget on the embedded photos, then measured on the same held-out photos.

    python benchmarks/benchmark_training.py [--quick] [--output BENCHMARKS.md] [-- extra train_vae.py flags]

Each model is trained by `diffusers_custom_vae.training.train` with the defaults of `python examples/train_vae.py`
(plus any extra flags given after `--`). The report (held-out PSNR, SSIM, MS-SSIM, training images/s, ratios and the
target of issue 4) is printed and written into this script's section of BENCHMARKS.md. `--quick` trains 2 steps at
32 px (a smoke test: the numbers mean nothing).
"""

import argparse
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _report import machine_description, write_section
from benchmark_vae import equal_width_autoencoder_kl
from transformers import HfArgumentParser

from diffusers_custom_vae.data import load_data
from diffusers_custom_vae.evaluation import common_crop, comparison_grid
from diffusers_custom_vae.loading import load_vae
from diffusers_custom_vae.training import TrainConfig, train

SECTION = "benchmark_training"
parse_args = lambda argv: HfArgumentParser(TrainConfig).parse_args_into_dataclasses(argv)[0]  # noqa: E731
QUICK_FLAGS = ["--resolution", "32", "--max_train_steps", "2", "--train_batch_size", "2"]


def train_both(flags: list[str], workdir: Path) -> dict[str, dict]:
    """{model name: what train() returned}, CustomVAE first, both with the same flags; each trained model is saved
    in workdir/<model name>."""
    equal_width_autoencoder_kl().save_config(workdir / "config")  # config.json with "_class_name": "AutoencoderKL"
    model_configs = {"CustomVAE": [], "AutoencoderKL": ["--model_config", str(workdir / "config" / "config.json")]}
    return {
        name: train(parse_args([*flags, "--report_to", "none", "--output_dir", str(workdir / name), *model_config]))
        for name, model_config in model_configs.items()
    }


def report(results: dict[str, dict], config: TrainConfig, command: str, wall_seconds: float, image: str) -> str:
    ours, theirs = results["CustomVAE"], results["AutoencoderKL"]
    passed = ours["psnr"] >= theirs["psnr"]
    lines = [
        "## The main job: CustomVAE vs AutoencoderKL, same trainer, same budget (`benchmarks/benchmark_training.py`)",
        "",
        f"- Date: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; wall time {wall_seconds / 60:.1f} min",
        f"- Command: `{command}`",
        f"- Machine: {machine_description('cpu')}",
        f"- Training: {ours['train_steps']} steps of {config.train_batch_size} images at "
        f"{config.resolution[0]}x{config.resolution[1]}, learning rate {config.learning_rate} ({config.lr_scheduler}, "
        f"{config.lr_warmup_steps} warm-up steps), {config.rec_loss} + KL {config.kl_scale}, seed {config.seed}: "
        "the defaults of `python examples/train_vae.py` unless the command says otherwise.",
        f"- Held-out: {ours['split']}; reconstructions decoded from the posterior's mode.",
        "- AutoencoderKL: block_out_channels (32, 64, 128, 128), 4 Down/UpDecoderBlock2D, layers_per_block 2, "
        "4 latent channels: the widths of CustomVAE's default config.",
        "",
        f"**{'PASS' if passed else 'FAIL'}** (issue 4): CustomVAE's held-out PSNR is at least AutoencoderKL's "
        f"({ours['psnr']:.2f} vs {theirs['psnr']:.2f} dB).",
        "",
        "| model | PSNR (dB) | SSIM | MS-SSIM | training images/s | minutes of steps |",
        "|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        lines.append(
            f"| {name} | {result['psnr']:.2f} | {result['ssim']:.4f} | {result['ms_ssim']:.4f} | "
            f"{result['train_images_per_second']:.2f} | {result['train_seconds'] / 60:.1f} |"
        )
    ratio = {key: ours[key] / theirs[key] for key in ("ssim", "ms_ssim", "train_images_per_second")}
    lines.append(
        f"| CustomVAE / AutoencoderKL | {ours['psnr'] - theirs['psnr']:+.2f} dB | {ratio['ssim']:.3f} | "
        f"{ratio['ms_ssim']:.3f} | {ratio['train_images_per_second']:.2f} | |"
    )
    lines += ["", "The held-out photos (top), CustomVAE's reconstructions, then AutoencoderKL's:", ""]
    lines.append(f"![held-out photos and their reconstructions]({image})")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 steps at 32 px: a smoke test")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument(
        "--image",
        type=Path,
        default=Path(__file__).resolve().parent / "benchmark_training.png",
        help="where to save the held-out photos above each model's reconstructions",
    )
    parser.add_argument("train_flags", nargs="*", help="extra train_vae.py flags, after --")
    args = parser.parse_args()
    if not args.output.parent.is_dir():
        parser.error(f"--output {args.output}: its folder does not exist")
    flags = [*(QUICK_FLAGS if args.quick else []), *args.train_flags]
    command = shlex.join(["python", "benchmarks/benchmark_training.py", *sys.argv[1:]])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        results = train_both(flags, Path(workdir))
        vaes = [load_vae(str(Path(workdir) / name)).eval() for name in results]
        comparison_grid(vaes, common_crop(load_data().test)).save(args.image)
    image = os.path.relpath(args.image, args.output.parent)  # as the markdown file links it
    markdown = report(results, parse_args(flags), command, time.perf_counter() - start, image)
    print(markdown)
    write_section(args.output, SECTION, markdown)
    print(f"\nWritten to the {SECTION} section of {os.fspath(args.output)}")


if __name__ == "__main__":
    main()
