"""Latent diffusion (`train_latent_diffusion.py`) measured two ways.

    python -m benchmarks.benchmark_latent_diffusion [--quick] [--resolution 256] [--batch_size 8]
        [--train_config JSON] [--diffusion_config JSON] [--results DIR] [--output BENCHMARKS.md] [--image PNG]

1. Throughput: training with the latent cache against encoding every batch. The same tiny DiT, objective and batch,
   on the latents of the default `CustomVAE` (random weights: its speed does not depend on them) at `--resolution`.
   A cached step reads posteriors from `cache_latents` and runs `LatentDiffusionObjective.loss`, backward and an AdamW
   step; an encoding step first runs the VAE's encoder on the batch's images, then does the same. The images are
   decoded and cropped before timing, so the encoding path is charged for the VAE alone (the real gap is larger). The
   steps take turns (`measure.interleaved_times`), so the machine's load falls on both alike. The one-off cost of
   filling the cache is reported too.
2. Which latent space diffuses better: CustomVAE and an equal-width AutoencoderKL are trained by the same trainer with
   the same budget (as `benchmark_training.py` does: `--train_config` changes both), then a DiT is trained on each
   one's latents with the same budget (`LatentDiffusionConfig`'s defaults, the second main job's, changed by
   `--diffusion_config`). Reported: each DiT's held-out denoising loss, its latents' scaled standard deviation, FID of
   its samples (or why it was skipped) and its samples (`--image`).

Runs on CUDA when there is one. `--quick`: tiny sizes and 2 steps everywhere (a smoke test: the numbers mean nothing).
The results are saved as benchmarks/results/benchmark_latent_diffusion.json; BENCHMARKS.md is rendered from them.
"""

import argparse
import dataclasses
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.data import load_data
from diffusers_custom_vae.latent_cache import cache_latents
from diffusers_custom_vae.training import TrainConfig, VAEObjective, train
from diffusers_custom_vae.training.config import LatentDiffusionConfig
from diffusers_custom_vae.training.latent_diffusion import LatentDiffusionObjective

from .benchmark_training import SET_BY_THE_BENCHMARK, train_configs
from .measure import interleaved_times
from .models import CUSTOM_VAE_WIDTHS
from .render import add_output_arguments, publish
from .report import Target, budget, json_object, refuse_unknown_fields, the_run

SECTION = "benchmark_latent_diffusion"
COMMAND = "python -m benchmarks.benchmark_latent_diffusion"
TARGET_RATIO = 3.0
QUICK_VAE_FIELDS = {"resolution": 32, "max_train_steps": 2, "train_batch_size": 2}
QUICK_DIFFUSION_FIELDS = {
    "resolution": 32,
    "max_train_steps": 2,
    "train_batch_size": 2,
    "num_inference_steps": 2,
    "validation_steps": 1000,
}
SET_BY_THE_BENCHMARK_FOR_DITS = ("vae", "vae_subfolder", "output_dir", "report_to", "cache_dir")


def steps(resolution: int, batch_size: int, workdir: Path, device: str) -> tuple[dict, dict]:
    """({"cached": step, "encoding every batch": step}, facts): two training steps of one tiny DiT objective."""
    CustomVAE().save_pretrained(workdir / "vae")  # the default CustomVAE, random weights
    config = LatentDiffusionConfig(
        vae=str(workdir / "vae"),
        model_config="tiny",
        resolution=[resolution],
        train_batch_size=batch_size,
        output_dir=str(workdir / "out"),
        report_to="none",
    )
    objective = LatentDiffusionObjective(config)
    model, vae = objective.model.to(device).train(), objective.vae.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate)
    train_split = load_data(resolution=resolution, downsample_factor=objective.factor, class_labels=True).train
    count = 4 * batch_size  # enough items to take turns through
    train_split.images, train_split.labels = train_split.images[:count], train_split.labels[:count]
    start = time.perf_counter()
    latents = cache_latents(
        vae, train_split, random_flip=True, cache_dir=workdir / "cache", batch_size=batch_size, device=device
    )
    cache_seconds = time.perf_counter() - start
    fixed = train_split.fixed_view()
    images = torch.stack([fixed[i] for i in range(count)]).to(device)
    position = [0]

    def next_indices() -> list[int]:
        position[0] = (position[0] + batch_size) % count
        return list(range(position[0], position[0] + batch_size))

    def optimise(batch: dict):
        loss, _ = objective.loss(model, batch, step=0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def cached_step():
        batch = torch.utils.data.default_collate([latents[i] for i in next_indices()])
        optimise({name: values.to(device) for name, values in batch.items()})

    def encoding_step():
        indices = next_indices()
        with torch.no_grad():
            posterior = vae.encode(images[indices]).latent_dist
        optimise({"mean": posterior.mean, "std": posterior.std, "label": latents.labels[indices].to(device)})

    facts = {
        "cache_images_per_second": count / cache_seconds,
        "latent_shape": list(latents.latent_shape),
        "dit_parameters": sum(p.numel() for p in model.parameters()),
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
    }
    return {"cached": cached_step, "encoding every batch": encoding_step}, facts


def throughput(resolution: int, batch_size: int, quick: bool, workdir: Path, device: str) -> dict:
    """Training images/s of the cached and the encoding step, and the facts of the setup."""
    calls, facts = steps(resolution, batch_size, workdir, device)
    rounds, min_run_time = (1, 0.05) if quick else (3, 5.0)
    times = interleaved_times(calls, rounds, min_run_time)
    images_per_second = {name: batch_size / measurement.median for name, measurement in times.items()}
    return {"resolution": resolution, "batch_size": batch_size, "images_per_second": images_per_second, **facts}


def latent_spaces(vae_fields: dict, diffusion_fields: dict, workdir: Path, image: Path) -> tuple[dict, dict, dict]:
    """(budgets, {model: its VAE's `train` results}, {model: its DiT's}): a VAE of each kind trained alike, then a DiT
    trained alike on each one's latents; their samples saved side by side in `image`."""
    vae_configs = train_configs(vae_fields, workdir)
    vaes = {name: train(config, VAEObjective) for name, config in vae_configs.items()}
    dit_configs = {
        name: LatentDiffusionConfig(
            **diffusion_fields,
            vae=config.output_dir,
            output_dir=str(workdir / f"{name}-dit"),
            cache_dir=str(workdir / "cache"),
            report_to="none",
        )
        for name, config in vae_configs.items()
    }
    dits = {name: train(config, LatentDiffusionObjective) for name, config in dit_configs.items()}
    side_by_side([Image.open(Path(config.output_dir) / "samples.png") for config in dit_configs.values()]).save(image)
    config = next(iter(dit_configs.values()))
    diffusion_budget = {
        field: getattr(config, field)
        for field in ("model_config", "train_batch_size", "resolution", "learning_rate", "use_ema", "seed")
    } | {"guidance_scale": config.guidance_scale, "num_inference_steps": config.num_inference_steps}
    return {"vae_budget": budget(vae_configs["CustomVAE"]), "diffusion_budget": diffusion_budget}, vaes, dits


def side_by_side(images: list[Image.Image], gap: int = 8) -> Image.Image:
    """The images left to right, `gap` white pixels apart."""
    width, height = sum(i.width for i in images) + gap * (len(images) - 1), max(i.height for i in images)
    canvas, left = Image.new("RGB", (width, height), "white"), 0
    for picture in images:
        canvas.paste(picture.convert("RGB"), (left, 0))
        left += picture.width + gap
    return canvas


def target(images_per_second: dict[str, float], resolution: int) -> Target:
    cached, encoding = images_per_second["cached"], images_per_second["encoding every batch"]
    return Target(
        f"training with the latent cache at least {TARGET_RATIO:g}x as fast as encoding every batch ({resolution} px)",
        cached / encoding,
        TARGET_RATIO,
        at_least=True,
        detail=f"{cached / encoding:.2f}x ({cached:.2f} vs {encoding:.2f} images/s)",
    )


def main(argv: list[str] | None = None) -> dict:
    """The command line; returns the results saved in the results file."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 steps: a smoke test")
    parser.add_argument("--resolution", type=int, default=256, help="image size of the throughput part (default 256)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step of the throughput part (default 8)")
    parser.add_argument(
        "--train_config", type=json_object, default={}, help="TrainConfig fields for both VAEs, as a JSON object"
    )
    parser.add_argument(
        "--diffusion_config",
        type=json_object,
        default={},
        help="LatentDiffusionConfig fields for both DiTs, as a JSON object, e.g. '{\"max_train_steps\": 3000}'",
    )
    add_output_arguments(
        parser,
        "benchmark_latent_diffusion.png",
        "where to save the samples of the DiT on CustomVAE's latents beside those on AutoencoderKL's",
    )
    args = parser.parse_args(argv)
    for path in (args.output, args.image):
        if not path.parent.is_dir():
            parser.error(f"{path}: its folder does not exist")
    vae_fields = {**(QUICK_VAE_FIELDS if args.quick else {}), **args.train_config}
    diffusion_fields = {**(QUICK_DIFFUSION_FIELDS if args.quick else {}), **args.diffusion_config}
    refuse_unknown_fields(parser, "--train_config", vae_fields, TrainConfig, SET_BY_THE_BENCHMARK)
    refuse_unknown_fields(
        parser, "--diffusion_config", diffusion_fields, LatentDiffusionConfig, SET_BY_THE_BENCHMARK_FOR_DITS
    )
    resolution, batch_size = (64, 2) if args.quick else (args.resolution, args.batch_size)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        try:
            speed = throughput(resolution, batch_size, args.quick, Path(workdir), device)
            budgets, vaes, dits = latent_spaces(vae_fields, diffusion_fields, Path(workdir), args.image)
        except ValueError as error:  # a size that does not fit the VAE, a config's own checks of its values
            parser.error(str(error))
    data = {
        **the_run(COMMAND, argv, start, device),
        "device": device,
        "targets": [dataclasses.asdict(target(speed["images_per_second"], resolution))],
        "throughput": speed,
        **budgets,
        "autoencoder_kl_widths": CUSTOM_VAE_WIDTHS,
        "vaes": vaes,
        "dits": dits,
        "image": os.path.relpath(args.image, args.results),  # as the results file links it
    }
    publish(SECTION, data, args.results, args.output)
    return data


if __name__ == "__main__":
    main()
