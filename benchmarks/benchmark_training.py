"""The main job side by side: CustomVAE and diffusers' AutoencoderKL of equal width, trained by the same trainer with
the same budget on the embedded photos, then measured on the same held-out photos.

    python -m benchmarks.benchmark_training [--quick] [--train_config JSON] [--results DIR] [--output BENCHMARKS.md]
        [--image PNG]

Each model is trained by `train(TrainConfig(...))` with TrainConfig's defaults (those of `python
examples/train_vae.py`), changed by the fields given in --train_config for both alike. The results (what `train`
returned for each: held-out PSNR, SSIM, MS-SSIM, training images/s; and the target checked) are saved as
benchmarks/results/benchmark_training.json, and BENCHMARKS.md is rendered from them (`render.py`), with an image of the
held-out photos above each model's reconstructions. `--quick` trains 2 steps at 32 px (a smoke test: the numbers mean
nothing).
"""

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

from diffusers_custom_vae.data import load_data
from diffusers_custom_vae.evaluation import common_crop, comparison_grid
from diffusers_custom_vae.loading import load_vae
from diffusers_custom_vae.training import TrainConfig, VAEObjective, train

from .models import CUSTOM_VAE_WIDTHS, autoencoder_kl
from .render import add_output_arguments, publish
from .report import Target, budget, json_object, refuse_unknown_fields, the_run

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
    add_output_arguments(
        parser,
        "benchmark_training.png",
        "where to save the held-out photos above each model's reconstructions",
    )
    args = parser.parse_args(argv)
    if not args.output.parent.is_dir():
        parser.error(f"--output {args.output}: its folder does not exist")
    fields = {**(QUICK_FIELDS if args.quick else {}), **args.train_config}
    refuse_unknown_fields(parser, "--train_config", args.train_config, TrainConfig, SET_BY_THE_BENCHMARK)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        try:
            configs = train_configs(fields, Path(workdir))
        except ValueError as error:  # TrainConfig's own checks of the values
            parser.error(f"--train_config: {error}")
        results = {name: train(config, VAEObjective) for name, config in configs.items()}
        vaes = [load_vae(config.output_dir).eval() for config in configs.values()]
        comparison_grid(vaes, common_crop(load_data().test)).save(args.image)
    data = {
        **the_run(COMMAND, argv, start, "cpu"),
        "budget": budget(configs["CustomVAE"]),
        "autoencoder_kl_widths": CUSTOM_VAE_WIDTHS,
        "targets": [dataclasses.asdict(target(results))],
        "models": results,
        "image": os.path.relpath(args.image, args.results),  # as the results file links it
    }
    publish(SECTION, data, args.results, args.output)
    return results


if __name__ == "__main__":
    main()
