"""The main job side by side: CustomVAE and diffusers' AutoencoderKL of equal width, trained by the same trainer with
the same budget on the embedded photos, then measured on the same held-out photos.

    python -m benchmarks.benchmark_training [--quick] [--train_config JSON] [--output BENCHMARKS.md] [--image PNG]

Each model is trained by `train(TrainConfig(...))` with TrainConfig's defaults (those of `python
examples/train_vae.py`), changed by the fields given in --train_config for both alike. The report (held-out PSNR,
SSIM, MS-SSIM, training images/s, ratios, and the target checked) is printed and written into this module's section
of BENCHMARKS.md, with an image of the held-out photos above each model's reconstructions. `--quick` trains 2 steps at
32 px (a smoke test: the numbers mean nothing).
"""

import argparse
import dataclasses
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from diffusers_custom_vae.data import load_data
from diffusers_custom_vae.evaluation import common_crop, comparison_grid
from diffusers_custom_vae.loading import load_vae
from diffusers_custom_vae.training import TrainConfig, VAEObjective, train

from .models import CUSTOM_VAE_WIDTHS, autoencoder_kl
from .report import Target, json_object, machine_description, publish

SECTION = "benchmark_training"
COMMAND = "python -m benchmarks.benchmark_training"
QUICK_FIELDS = {"resolution": 32, "max_train_steps": 2, "train_batch_size": 2}
SET_BY_THE_BENCHMARK = ("output_dir", "model_config", "report_to")


def train_configs(fields: dict, workdir: Path) -> dict[str, TrainConfig]:
    """{model name: its TrainConfig}, CustomVAE first: `fields` for both alike, each its own output folder
    workdir/<model name>; AutoencoderKL through a model config file of CustomVAE's widths, written into workdir."""
    autoencoder_kl().save_config(workdir / "autoencoder_kl")  # config.json with "_class_name": "AutoencoderKL"
    model_configs = {"CustomVAE": None, "AutoencoderKL": str(workdir / "autoencoder_kl" / "config.json")}
    return {
        name: TrainConfig(**fields, output_dir=str(workdir / name), model_config=model_config, report_to="none")
        for name, model_config in model_configs.items()
    }


def target(results: dict[str, dict]) -> Target:
    ours, theirs = results["CustomVAE"]["psnr"], results["AutoencoderKL"]["psnr"]
    return Target(
        "CustomVAE's held-out PSNR at least AutoencoderKL's, trained alike",
        ours - theirs,
        0.0,
        at_least=True,
        detail=f"{ours:.2f} vs {theirs:.2f} dB",
    )


def report(results: dict[str, dict], config: TrainConfig, command: str, wall_seconds: float, image: str) -> str:
    ours, theirs = results["CustomVAE"], results["AutoencoderKL"]
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
        f"- AutoencoderKL: block_out_channels {CUSTOM_VAE_WIDTHS}, 4 Down/UpDecoderBlock2D, layers_per_block 2, "
        "4 latent channels: the widths of CustomVAE's default config.",
        "",
        "Target: CustomVAE reconstructs at least as well as diffusers' own architecture of the same width given the "
        "same training.",
        "",
        target(results).markdown(),
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


def main(argv: list[str] | None = None) -> dict[str, dict]:
    """The command line; returns {model name: what `train` returned}."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 steps at 32 px: a smoke test")
    parser.add_argument(
        "--train_config",
        type=json_object,
        default={},
        help='TrainConfig fields for both models, as a JSON object, e.g. \'{"resolution": 256, "max_train_steps": '
        "50000}' (default: none; the benchmark sets " + ", ".join(SET_BY_THE_BENCHMARK) + " itself)",
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    parser.add_argument(
        "--image",
        type=Path,
        default=Path(__file__).resolve().parent / "benchmark_training.png",
        help="where to save the held-out photos above each model's reconstructions",
    )
    args = parser.parse_args(argv)
    if not args.output.parent.is_dir():
        parser.error(f"--output {args.output}: its folder does not exist")
    fields = {**(QUICK_FIELDS if args.quick else {}), **args.train_config}
    settable = {field.name for field in dataclasses.fields(TrainConfig)} - set(SET_BY_THE_BENCHMARK)
    if unknown := sorted(set(args.train_config) - settable):
        parser.error(
            f"--train_config: {', '.join(unknown)}: expected TrainConfig fields other than "
            f"{', '.join(SET_BY_THE_BENCHMARK)} (the benchmark sets those)"
        )

    command = " ".join([COMMAND, shlex.join(sys.argv[1:] if argv is None else argv)]).strip()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        try:
            configs = train_configs(fields, Path(workdir))
        except ValueError as error:  # TrainConfig's own checks of the values
            parser.error(f"--train_config: {error}")
        results = {name: train(config, VAEObjective) for name, config in configs.items()}
        vaes = [load_vae(config.output_dir).eval() for config in configs.values()]
        comparison_grid(vaes, common_crop(load_data().test)).save(args.image)
    image = os.path.relpath(args.image, args.output.parent)  # as the markdown file links it
    markdown = report(results, configs["CustomVAE"], command, time.perf_counter() - start, image)
    publish(args.output, SECTION, markdown)
    return results


if __name__ == "__main__":
    main()
