"""Benchmark `CustomVAE` against the tutorial's own VAE and diffusers' `AutoencoderKL` of equal width.

    python -m benchmarks.benchmark_vae [--quick] [--device cpu|cuda] [--results DIR] [--output BENCHMARKS.md]

In one run on one machine, for the three models: training-step images/s, encode and decode images/s, and the time and
peak memory of decoding one large image with and without tiling, each in a process of its own so that peaks don't mix.
The results, with CustomVAE's targets checked, are saved as benchmarks/results/benchmark_vae.json, and BENCHMARKS.md
is rendered from them (`render.py`). `--quick` runs every code path at tiny sizes (a smoke test: the numbers mean
nothing).
"""

import argparse
import dataclasses
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from tqdm import tqdm

from benchmarks import tutorial
from diffusers_custom_vae import CustomVAE

from .measure import PeakMemory, available_gb, interleaved_times
from .models import CUSTOM_VAE_WIDTHS, autoencoder_kl
from .render import add_output_arguments, publish
from .report import Target, the_run

SECTION = "benchmark_vae"
COMMAND = "python -m benchmarks.benchmark_vae"
DOWNSAMPLING = 8  # all three models
LATENT_CHANNELS = 4
KL_WEIGHT = 1e-6


@dataclass(frozen=True)
class Plan:
    train: dict[int, int]  # resolution -> batch size of one training step
    inference: dict[int, int]  # resolution -> batch size of one encode or decode
    large_decode: tuple[int, ...]  # sides of the single images decoded, each in a process of its own
    rounds: int  # turns each model takes at a training or inference case (see measure.interleaved_times)
    min_run_time: float  # seconds of timed calls per turn (at least one call), after one untimed warm-up call
    tile: int  # tile side for enable_tiling, in pixels


FULL = Plan(
    train={64: 8, 128: 4}, inference={256: 2, 512: 1}, large_decode=(1024, 2048), rounds=3, min_run_time=1.0, tile=512
)
QUICK = Plan(train={16: 2, 32: 2}, inference={32: 2, 64: 1}, large_decode=(96,), rounds=1, min_run_time=0.0, tile=64)


@dataclass(frozen=True)
class Subject:
    """A model under test and the calls the benchmark makes of it."""

    build: Callable[[], torch.nn.Module]
    moments: Callable  # (vae, images (B, 3, H, W)) -> mean, logvar, each (B, 4, H / 8, W / 8)
    decode: Callable  # (vae, latents (B, 4, h, w)) -> images (B, 3, 8h, 8w)
    tiles: bool


def _posterior_moments(vae, images):
    posterior = vae.encode(images).latent_dist
    return posterior.mean, posterior.logvar


SUBJECTS = {
    "CustomVAE": Subject(CustomVAE, _posterior_moments, lambda vae, z: vae.decode(z).sample, tiles=True),
    "tutorial": Subject(tutorial.VAE, lambda vae, x: vae.encoder(x), lambda vae, z: vae.decoder(z), tiles=False),
    "AutoencoderKL": Subject(autoencoder_kl, _posterior_moments, lambda vae, z: vae.decode(z).sample, tiles=True),
}


def enable_tiling(name: str, vae, tile: int):
    if name == "CustomVAE":
        vae.enable_tiling(tile, tile // DOWNSAMPLING)  # 512 px tiles overlapping by 64 px: its defaults
    else:  # AutoencoderKL tiles at config.sample_size (32 px by default) and overlaps by a quarter of a tile
        vae.enable_tiling()
        vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // DOWNSAMPLING


def median_seconds(calls: dict[str, Callable[[], object]], plan: Plan) -> dict[str, float]:
    measurements = interleaved_times(calls, plan.rounds, plan.min_run_time)
    return {name: measurement.median for name, measurement in measurements.items()}


def _training_step(subject: Subject, vae, images: torch.Tensor) -> Callable[[], None]:
    """One step: encode, sample the posterior, decode, L1 + KL loss, backward, AdamW."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    vae.train()

    def step():
        mean, logvar = subject.moments(vae, images)
        latents = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
        loss = F.l1_loss(subject.decode(vae, latents), images) + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def training_images_per_second(vaes: dict, resolution: int, batch: int, plan: Plan, device: str) -> dict[str, float]:
    images = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    steps = {name: _training_step(SUBJECTS[name], vae, images) for name, vae in vaes.items()}
    seconds = median_seconds(steps, plan)
    for vae in vaes.values():
        vae.zero_grad(set_to_none=True)
    return {name: batch / seconds[name] for name in vaes}


@torch.no_grad()
def inference_images_per_second(
    vaes: dict, operation: str, resolution: int, batch: int, plan: Plan, device: str
) -> dict[str, float]:
    if operation == "encode":
        inputs = torch.rand(batch, 3, resolution, resolution, device=device) * 2 - 1
    else:
        side = resolution // DOWNSAMPLING
        inputs = torch.randn(batch, LATENT_CHANNELS, side, side, device=device)
    calls = {}
    for name, vae in vaes.items():
        run_model = getattr(SUBJECTS[name], "moments" if operation == "encode" else "decode")
        calls[name] = partial(run_model, vae.eval(), inputs)
    seconds = median_seconds(calls, plan)
    return {name: batch / seconds[name] for name in vaes}


# Decoding one large image, in a process of its own.


@torch.no_grad()
def measure_large_decode(name: str, size: int, tiled: bool, plan: Plan, device: str) -> dict:
    """Seconds of decoding one size x size image (one untimed warm-up decode, then one timed) and the peak memory of
    both; run alone in its process."""
    subject = SUBJECTS[name]
    torch.manual_seed(0)
    vae = subject.build().to(device).eval()
    if tiled:
        enable_tiling(name, vae, plan.tile)
    latents = torch.randn(1, LATENT_CHANNELS, size // DOWNSAMPLING, size // DOWNSAMPLING, device=device)
    with PeakMemory(device) as memory:
        decode = partial(subject.decode, vae, latents)
        measurement = interleaved_times({name: decode}, rounds=1, min_run_time=0)[name]
    return {"seconds": measurement.median, "peak_gb": memory.peak_gb, "baseline_gb": memory.baseline_gb}


def estimated_decode_gb(name: str, size: int, tiled: bool, plan: Plan) -> float:
    """Memory one decode needs above the loaded model, roughly: the larger of six float32 activations of the widest
    full-resolution layer (64 channels; CustomVAE peaks at about five) and, for the tutorial, the two (heads, T, T)
    float32 attention matrices its explicit softmax holds at once (T = latent pixels of a tile); plus the output and
    its blending weights: 8.6 GB for the tutorial at 1024x1024 (measured: 8.65)."""
    side = min(size, plan.tile) if tiled else size
    activations = 6 * side**2 * CUSTOM_VAE_WIDTHS[1] * 4
    heads, tokens = 4, (side // DOWNSAMPLING) ** 2
    attention = 2 * heads * tokens**2 * 4 if name == "tutorial" else 0
    output = 2 * 4 * size**2 * 4
    return (max(activations, attention) + output) / 1e9


def large_decode(name: str, size: int, tiled: bool, plan: Plan, device: str, processes) -> dict | str:
    """`measure_large_decode` in a new process of the `processes` context, or why it was not run."""
    if tiled and not SUBJECTS[name].tiles:
        return "n/a (no tiling)"
    needed, available = estimated_decode_gb(name, size, tiled, plan), available_gb(device)
    if needed > 0.75 * available:
        return f"skipped: needs ~{needed:.0f} GB ({available:.0f} GB free)"
    with ProcessPoolExecutor(max_workers=1, mp_context=processes) as process:
        try:
            return process.submit(measure_large_decode, name, size, tiled, plan, device).result()
        except BrokenProcessPool:
            return "failed: the process died (out of memory? its error, if any, is printed above)"


# The run and its targets.


def run(plan: Plan, device: str) -> dict:
    """Every measurement: results[table][resolution][model] is a number (images/s) for the tables "train", "encode"
    and "decode"; results["large"][side]["untiled" or "tiled"][model] a dict of seconds, peak_gb and baseline_gb. Where
    there is no measurement, a string says why."""
    vaes = {}
    for name, subject in SUBJECTS.items():
        torch.manual_seed(0)
        vaes[name] = subject.build().to(device)
    # Each large decode gets a process of its own, forked from a server that has only imported this module and its
    # libraries: nothing left in memory from earlier cases, and the imports are paid once. (Under `python -m`, each
    # process also runs this module's top level again as its "__main__": cheap, its imports being done.)
    processes = multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload(["benchmarks.benchmark_vae"])
    cases = []  # (where in results, what the progress bar says, measurement() -> {model: value})
    for resolution, batch in plan.train.items():
        measure = partial(training_images_per_second, vaes, resolution, batch, plan, device)
        cases.append((("train", resolution), f"train {resolution} px", measure))
    for operation in ("encode", "decode"):
        for resolution, batch in plan.inference.items():
            measure = partial(inference_images_per_second, vaes, operation, resolution, batch, plan, device)
            cases.append(((operation, resolution), f"{operation} {resolution} px", measure))
    for size in plan.large_decode:
        for tiling in ("untiled", "tiled"):
            for name in SUBJECTS:
                measure = partial(large_decode, name, size, tiling == "tiled", plan, device, processes)
                label = f"decode one {size} px image, {tiling}, {name}"
                cases.append((("large", size, tiling), label, lambda name=name, measure=measure: {name: measure()}))
    results = {}
    with tqdm(cases, desc="benchmark_vae", unit="case") as progress:
        for keys, label, measure in progress:
            progress.set_postfix_str(label)
            case = results
            for key in keys:
                case = case.setdefault(key, {})
            case.update(measure())
    return results


def targets(results: dict, plan: Plan) -> list[Target]:
    """CustomVAE's targets: it trains at least as fast as AutoencoderKL of equal width; a large image decoded with
    tiling stays under 3 GB; and decode time grows with the pixels, not faster (per megapixel, a large image costs at
    most 1.5x a small one)."""
    found = []
    for resolution, speeds in results["train"].items():
        mine, theirs = speeds["CustomVAE"], speeds["AutoencoderKL"]
        what = f"training throughput at {resolution} px at least AutoencoderKL's at equal width"
        detail = f"{mine / theirs:.2f}x ({mine:.2f} vs {theirs:.2f} images/s)"
        found.append(Target(what, mine / theirs, 1.0, at_least=True, detail=detail))

    large, small = plan.large_decode[-1], max(plan.inference)
    what = f"{large}x{large} decoded (tiled) with a peak memory of at most 3 GB"
    case = results["large"][large]["tiled"]["CustomVAE"]
    if isinstance(case, str):
        found.append(Target(what, case, 3.0, at_least=False, detail=case))
    else:
        detail = f"{case['peak_gb']:.2f} GB above the process's {case['baseline_gb']:.2f} GB baseline"
        found.append(Target(what, case["peak_gb"], 3.0, at_least=False, detail=detail))

    small_seconds_per_megapixel = 1e6 / (results["decode"][small]["CustomVAE"] * small**2)
    for tiling in ("tiled", "untiled"):
        what = (
            f"decode time per megapixel at {large}x{large} ({tiling}) at most 1.5x that at {small}x{small} (untiled)"
        )
        case = results["large"][large][tiling]["CustomVAE"]
        if isinstance(case, str):
            found.append(Target(what, case, 1.5, at_least=False, detail=case))
            continue
        seconds_per_megapixel = case["seconds"] * 1e6 / large**2
        ratio = seconds_per_megapixel / small_seconds_per_megapixel
        detail = f"{ratio:.2f}x ({seconds_per_megapixel:.2f} vs {small_seconds_per_megapixel:.2f} s/MP)"
        found.append(Target(what, ratio, 1.5, at_least=False, detail=detail))
    return found


def main(argv: list[str] | None = None) -> dict:
    """The command line; returns `run`'s results."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few repeats: a smoke test")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given, but torch sees no CUDA device; use --device cpu.")
    if not args.output.parent.is_dir():
        parser.error(f"--output {args.output}: the folder {args.output.parent} does not exist.")
    plan = QUICK if args.quick else FULL

    start, load_before = time.perf_counter(), os.getloadavg()[0]
    results = run(plan, args.device)
    data = {
        **the_run(COMMAND, argv, start, args.device),
        "device": args.device,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "parameters": {
            name: sum(p.numel() for p in subject.build().parameters()) for name, subject in SUBJECTS.items()
        },
        "autoencoder_kl_widths": CUSTOM_VAE_WIDTHS,
        "plan": dataclasses.asdict(plan),
        "targets": [dataclasses.asdict(target) for target in targets(results, plan)],
        **results,
    }
    publish(SECTION, data, args.results, args.output)
    return results


if __name__ == "__main__":
    main()
