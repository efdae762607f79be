"""Latent diffusion's training throughput with the latent cache against encoding every batch: the same tiny DiT, the
same objective and batch, on the latents of the default `CustomVAE` at 256 px.

    python -m benchmarks.benchmark_latent_diffusion [--quick] [--resolution 256] [--batch_size 8] [--output MD]

A cached step reads posteriors from `cache_latents` and runs `LatentDiffusionObjective.loss`, backward and an AdamW
step; an encoding step first runs the VAE's encoder on the batch's images, then does the same. The images are
decoded and cropped before timing, so the encoding path is not charged for reading files (the real gap is larger).
The steps take turns (`measure.interleaved_times`), so the shared machine's load falls on both alike. The one-off
cost of filling the cache is reported too. The VAE has random weights: its speed does not depend on them. Runs on
CUDA when there is one. `--quick`: 64 px, batch 2, short timings (a smoke test: the numbers mean nothing).
"""

import argparse
import shlex
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import torch

from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.data import load_data
from diffusers_custom_vae.latent_cache import cache_latents
from diffusers_custom_vae.training.config import LatentDiffusionConfig
from diffusers_custom_vae.training.latent_diffusion import LatentDiffusionObjective

from .measure import interleaved_times
from .report import Target, machine_description, publish

SECTION = "benchmark_latent_diffusion"
COMMAND = "python -m benchmarks.benchmark_latent_diffusion"
TARGET_RATIO = 3.0


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
    train = load_data(resolution=resolution, downsample_factor=objective.factor, class_labels=True).train
    count = 4 * batch_size  # enough items to take turns through
    train.images, train.labels = train.images[:count], train.labels[:count]
    start = time.perf_counter()
    latents = cache_latents(
        vae, train, random_flip=True, cache_dir=workdir / "cache", batch_size=batch_size, device=device
    )
    cache_seconds = time.perf_counter() - start
    fixed = train.fixed_view()
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
        "latent_shape": latents.latent_shape,
        "dit_parameters": sum(p.numel() for p in model.parameters()),
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
    }
    return {"cached": cached_step, "encoding every batch": encoding_step}, facts


def target(images_per_second: dict[str, float], resolution: int) -> Target:
    cached, encoding = images_per_second["cached"], images_per_second["encoding every batch"]
    return Target(
        f"training with the latent cache at least {TARGET_RATIO:g}x as fast as encoding every batch ({resolution} px)",
        cached / encoding,
        TARGET_RATIO,
        at_least=True,
        detail=f"{cached / encoding:.2f}x ({cached:.2f} vs {encoding:.2f} images/s)",
    )


def report(images_per_second, facts, resolution, batch_size, command, wall_seconds, device) -> str:
    lines = [
        "## Latent diffusion: training with the latent cache vs encoding every batch "
        "(`benchmarks/benchmark_latent_diffusion.py`)",
        "",
        f"- Date: {datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; wall time {wall_seconds / 60:.1f} min",
        f"- Command: `{command}`",
        f"- Machine: {machine_description(device)}",
        f"- Model: the tiny DiT preset ({facts['dit_parameters'] / 1e6:.2f} M parameters) on latents "
        f"{facts['latent_shape']} of the default CustomVAE ({facts['vae_parameters'] / 1e6:.2f} M parameters, random "
        f"weights) at {resolution} px; batch {batch_size}; `LatentDiffusionObjective.loss`, backward, AdamW step.",
        "- The encoding path gets its images decoded and cropped in advance: it is charged for the VAE alone.",
        f"- Filling the cache (once; with flipped images, so two encodings per image): "
        f"{facts['cache_images_per_second']:.2f} images/s.",
        "",
        target(images_per_second, resolution).markdown(),
        "",
        "| training step | images/s |",
        "|---|---|",
        *(f"| {name} | {value:.2f} |" for name, value in images_per_second.items()),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """The command line; returns {step: training images per second}."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="64 px, batch 2, short timings: a smoke test")
    parser.add_argument("--resolution", type=int, default=256, help="image size (default 256)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per step (default 8)")
    parser.add_argument("--output", type=Path, default=Path(__file__).resolve().parents[1] / "BENCHMARKS.md")
    args = parser.parse_args(argv)
    if not args.output.parent.is_dir():
        parser.error(f"--output {args.output}: its folder does not exist")
    resolution, batch_size = (64, 2) if args.quick else (args.resolution, args.batch_size)
    rounds, min_run_time = (1, 0.05) if args.quick else (3, 5.0)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    command = " ".join([COMMAND, shlex.join(sys.argv[1:] if argv is None else argv)]).strip()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        try:
            calls, facts = steps(resolution, batch_size, Path(workdir), device)
        except ValueError as error:  # e.g. a resolution that is not a multiple of the VAE's factor
            parser.error(str(error))
        times = interleaved_times(calls, rounds, min_run_time)
    images_per_second = {name: batch_size / measurement.median for name, measurement in times.items()}
    publish(
        args.output,
        SECTION,
        report(images_per_second, facts, resolution, batch_size, command, time.perf_counter() - start, device),
    )
    return images_per_second


if __name__ == "__main__":
    main()
