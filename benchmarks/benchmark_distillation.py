"""Distillation: student CustomVAEs in a teacher AutoencoderKL's latent space, trained by the same trainer with the
same budget: how faithfully they stand in for the teacher, and how much faster they decode.

    python -m benchmarks.benchmark_distillation [--quick] [--teacher FOLDER] [--students default small]
        [--train_config JSON] [--device cpu|cuda] [--results DIR] [--output BENCHMARKS.md] [--image PNG]

In one run: trains the teacher (an `AutoencoderKL` of CustomVAE's widths, on the embedded photos, with TrainConfig's
defaults: the main job's budget), or takes `--teacher`; distils each student (`CustomVAE()` with the teacher's latent
channels, and the "small" preset) with the same budget through `train(TrainConfig(teacher_vae=...))`, whose held-out
metrics are `evaluate_distillation`'s; then times the decoders (students, teacher, and an `AutoencoderKL` with Stable
Diffusion's exact VAE architecture, random weights: speed only) taking turns at 512 px, and decodes one 512 and one
1024 px image with each, in a process of its own, for time and peak memory. The results, with the targets checked, are
saved as benchmarks/results/benchmark_distillation.json, and BENCHMARKS.md is rendered from them (`render.py`), with an
image of held-out photos decoded by the teacher and each student from the teacher's latents. `--train_config` changes
the budget of every training alike. `--quick` runs every code path at tiny sizes (a smoke test: the numbers mean
nothing).
"""

import argparse
import dataclasses
import multiprocessing
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from diffusers_custom_vae.data import load_data
from diffusers_custom_vae.evaluation import common_crop
from diffusers_custom_vae.images import image_grid
from diffusers_custom_vae.loading import load_vae
from diffusers_custom_vae.training import DistillationObjective, TrainConfig, VAEObjective, train

from .measure import PeakMemory, available_gb, interleaved_times
from .models import CUSTOM_VAE_WIDTHS, STABLE_DIFFUSION_WIDTHS, autoencoder_kl
from .render import add_output_arguments, publish
from .report import Target, budget, json_object, refuse_unknown_fields, the_run

SECTION = "benchmark_distillation"
COMMAND = "python -m benchmarks.benchmark_distillation"
DOWNSAMPLING = 8  # every model here
STUDENTS = {"default": None, "small": "small"}  # --students name -> its TrainConfig.model_config
SET_BY_THE_BENCHMARK = ("output_dir", "model_config", "report_to", "teacher_vae", "teacher_vae_subfolder")
QUICK_FIELDS = {"resolution": 32, "max_train_steps": 2, "train_batch_size": 2}
SD = "sd_architecture"  # the decoder that is built, not trained or loaded
LABELS = {
    "teacher": "teacher",
    "default": "student `CustomVAE()`",
    "small": 'student, "small" preset',
    SD: "SD's VAE architecture",
}
# What the targets ask of a student: fidelity within these margins (dB) of the teacher, and decode speed.
STUDENT_MARGIN_DB, TEACHER_DECODES_STUDENT_MARGIN_DB, SPEEDUP_OVER_SD = 0.5, 1.0, 10.0


@dataclass(frozen=True)
class Plan:
    speed_side: int  # side of the image whose decode the models take turns at (the speed target's)
    rounds: int  # turns each model takes (see measure.interleaved_times)
    min_run_time: float  # seconds of timed calls per turn (at least one call), after one untimed warm-up call
    large_sides: tuple[int, ...]  # sides of the single images decoded, each in a process of its own
    warmup_side: int  # side of the untimed decode that precedes a large one (first-call set-up is not decoding)


FULL = Plan(speed_side=512, rounds=3, min_run_time=1.0, large_sides=(512, 1024), warmup_side=64)
QUICK = Plan(speed_side=64, rounds=1, min_run_time=0.0, large_sides=(64, 96), warmup_side=16)


@dataclass(frozen=True)
class Decoder:
    """A model whose decoder is measured: saved in `folder`, or (`folder` None) Stable Diffusion's VAE architecture
    with random weights; `widths` (its block_out_channels) size the memory a decode needs."""

    folder: str | None
    widths: tuple[int, ...]
    latent_channels: int = 4


def build_decoder(decoder: Decoder, device: str):
    if decoder.folder is None:
        torch.manual_seed(0)
        return autoencoder_kl(STABLE_DIFFUSION_WIDTHS).to(device).eval()
    return load_vae(decoder.folder).to(device).eval()


def decoder_parameters(vae) -> int:
    """Parameters of the decoding side (AutoencoderKL's post_quant_conv included)."""
    return sum(p.numel() for name, p in vae.named_parameters() if name.startswith(("decoder.", "post_quant_conv.")))


# The trainings.


def train_configs(fields: dict, workdir: Path, teacher: str | None, students: list[str]) -> dict[str, TrainConfig]:
    """{"teacher": its TrainConfig (unless `teacher`, a folder, is given), then each student's}: `fields` for all
    alike, each its own output folder workdir/<name>. The teacher is an AutoencoderKL of CustomVAE's widths, through a
    model config file written into workdir; each student distils the teacher's folder."""
    configs = {}
    if teacher is None:
        autoencoder_kl().save_config(workdir / "autoencoder_kl")  # config.json with "_class_name": "AutoencoderKL"
        teacher = str(workdir / "teacher")
        configs["teacher"] = TrainConfig(
            **fields,
            output_dir=teacher,
            model_config=str(workdir / "autoencoder_kl" / "config.json"),
            report_to="none",
        )
    for name in students:
        configs[name] = TrainConfig(
            **fields,
            output_dir=str(workdir / name),
            model_config=STUDENTS[name],
            teacher_vae=teacher,
            report_to="none",
        )
    return configs


# Decoding: the models taking turns, then one large image per process.


def decode_seconds(decoders: dict[str, torch.nn.Module], side: int, plan: Plan, device: str) -> dict[str, float]:
    """Median seconds of decoding one side x side image from random latents, the models taking turns."""
    generator = torch.Generator().manual_seed(0)
    shape = lambda vae: (1, vae.config.latent_channels, side // DOWNSAMPLING, side // DOWNSAMPLING)  # noqa: E731
    latents = {name: torch.randn(shape(vae), generator=generator).to(device) for name, vae in decoders.items()}

    @torch.no_grad()
    def decode(vae, latents):
        return vae.decode(latents).sample

    calls = {name: partial(decode, vae, latents[name]) for name, vae in decoders.items()}
    measurements = interleaved_times(calls, plan.rounds, plan.min_run_time)
    return {name: measurement.median for name, measurement in measurements.items()}


@torch.no_grad()
def measure_large_decode(decoder: Decoder, side: int, warmup_side: int, device: str) -> dict:
    """Seconds and peak memory of decoding one side x side image from random latents, after an untimed warm-up decode
    of a warmup_side image; run alone in its process. One call, timed directly (each call of SD's architecture at
    1024 px takes minutes on a CPU: `torch.utils.benchmark` would add calls)."""
    vae = build_decoder(decoder, device)
    torch.manual_seed(0)
    warmup = torch.randn(1, decoder.latent_channels, warmup_side // DOWNSAMPLING, warmup_side // DOWNSAMPLING)
    latents = torch.randn(1, decoder.latent_channels, side // DOWNSAMPLING, side // DOWNSAMPLING)
    vae.decode(warmup.to(device))
    latents = latents.to(device)
    with PeakMemory(device) as memory:
        start = time.perf_counter()
        vae.decode(latents)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_gb": memory.peak_gb, "baseline_gb": memory.baseline_gb}


def estimated_decode_gb(widths: tuple[int, ...], side: int) -> float:
    """Memory a decode needs above the loaded model, roughly: six float32 activations of the widest full-resolution
    tensor (the second level's width, which its upsampler carries to full resolution), plus the output."""
    return (6 * side**2 * widths[1] * 4 + 2 * 3 * side**2 * 4) / 1e9


def large_decode(decoder: Decoder, side: int, plan: Plan, device: str, processes) -> dict | str:
    """`measure_large_decode` in a new process of the `processes` context, or why it was not run."""
    needed, available = estimated_decode_gb(decoder.widths, side), available_gb(device)
    if needed > 0.75 * available:
        return f"skipped: needs ~{needed:.0f} GB ({available:.0f} GB free)"
    with ProcessPoolExecutor(max_workers=1, mp_context=processes) as process:
        try:
            return process.submit(measure_large_decode, decoder, side, plan.warmup_side, device).result()
        except BrokenProcessPool:
            return "failed: the process died (out of memory? its error, if any, is printed above)"


@torch.no_grad()
def decodes_grid(teacher, students: dict, images: torch.Tensor):
    """Originals (top), then the teacher's decode of its latents (posterior modes), then each student's decode of the
    same latents."""
    latents = teacher.encode(images.to(teacher.device)).latent_dist.mode()
    rows = [images, *(vae.decode(latents.to(vae.device)).sample for vae in (teacher, *students.values()))]
    return image_grid([row.float().cpu().clamp(-1, 1) for row in rows])


# The run and its targets.


def run(configs: dict[str, TrainConfig], teacher_folder: str, plan: Plan, device: str, image: Path) -> dict:
    """Trains, then measures: what `train` returned for the teacher (None when given) and each student, their decoder
    parameters, decode seconds, {side: {model: large decode}}, and the load average as the run went on."""
    load = {"before": os.getloadavg()[0]}
    trained = {
        name: train(config, DistillationObjective if config.teacher_vae else VAEObjective)
        for name, config in configs.items()
    }
    load["after the trainings"] = os.getloadavg()[0]
    students = [name for name in configs if name != "teacher"]

    folders = {"teacher": teacher_folder} | {name: configs[name].output_dir for name in students}
    vaes = {name: load_vae(folder).to(device).eval() for name, folder in folders.items()}
    vaes[SD] = build_decoder(Decoder(None, STABLE_DIFFUSION_WIDTHS), device)
    decoders = {
        name: Decoder(folders.get(name), tuple(vae.config.block_out_channels), vae.config.latent_channels)
        for name, vae in vaes.items()
    }
    parameters = {name: decoder_parameters(vae) for name, vae in vaes.items()}
    decodes_grid(vaes["teacher"], {name: vaes[name] for name in students}, common_crop(load_data().test)).save(image)
    speed = decode_seconds(vaes, plan.speed_side, plan, device)
    del vaes
    load["after the interleaved decodes"] = os.getloadavg()[0]

    # Each large decode gets a process of its own, forked from a server that has only imported this module and its
    # libraries: nothing left in memory from earlier cases (see benchmark_vae).
    processes = multiprocessing.get_context("forkserver")
    processes.set_forkserver_preload(["benchmarks.benchmark_distillation"])
    large = {
        side: {name: large_decode(decoder, side, plan, device, processes) for name, decoder in decoders.items()}
        for side in plan.large_sides
    }
    load["after the large decodes"] = os.getloadavg()[0]
    return {
        "teacher": trained.get("teacher"),  # None when given
        "students": {name: trained[name] for name in students},
        "parameters": parameters,
        "decode_seconds": speed,
        "large": large,
        "load": load,
    }


def targets(results: dict, plan: Plan) -> list[Target]:
    """For each student: it decodes the teacher's latents within 0.5 dB (PSNR against the originals) of the teacher's
    own decode, and the teacher decodes the student's latents within 1 dB of its own reconstructions. Then: the
    default student, or the "small" preset, decodes at least 10x faster than Stable Diffusion's VAE architecture."""
    found = []
    for name, metrics in results["students"].items():
        teacher, student = metrics["teacher_psnr"], metrics["psnr"]
        found.append(
            Target(
                f"{LABELS[name]} decodes the teacher's latents within {STUDENT_MARGIN_DB} dB of the teacher (PSNR "
                "against the originals)",
                teacher - student,
                STUDENT_MARGIN_DB,
                at_least=False,
                detail=f"{student:.2f} vs {teacher:.2f} dB ({student - teacher:+.2f} dB)",
            )
        )
        of_student = metrics["teacher_decodes_student_psnr"]
        found.append(
            Target(
                f"the teacher decodes the latents of the {LABELS[name]} within {TEACHER_DECODES_STUDENT_MARGIN_DB} dB "
                "of its own reconstructions",
                teacher - of_student,
                TEACHER_DECODES_STUDENT_MARGIN_DB,
                at_least=False,
                detail=f"{of_student:.2f} vs {teacher:.2f} dB ({of_student - teacher:+.2f} dB)",
            )
        )
    seconds = results["decode_seconds"]
    speedups = {name: seconds[SD] / seconds[name] for name in results["students"]}
    side = plan.speed_side
    found.append(
        Target(
            f'the default student or the "small" preset decodes {side}x{side} at least {SPEEDUP_OVER_SD:g}x faster '
            "than SD's VAE architecture",
            max(speedups.values()),
            SPEEDUP_OVER_SD,
            at_least=True,
            detail=", ".join(
                f"{name} {speedup:.1f}x ({seconds[name]:.3f} vs {seconds[SD]:.2f} s)"
                for name, speedup in speedups.items()
            ),
        )
    )
    return found


def main(argv: list[str] | None = None) -> dict:
    """The command line; returns `run`'s results."""
    parser = argparse.ArgumentParser(
        prog=COMMAND, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="2 steps at 32 px, tiny decodes: a smoke test")
    parser.add_argument(
        "--teacher",
        help="a trained AutoencoderKL or CustomVAE to distil: a folder, or a Hub id as --teacher_vae takes (default: "
        "train one of CustomVAE's widths with the students' budget)",
    )
    parser.add_argument(
        "--students",
        nargs="+",
        choices=list(STUDENTS),
        default=list(STUDENTS),
        help="which students to distil: default (CustomVAE()), small (the preset) (default: both)",
    )
    parser.add_argument(
        "--train_config",
        type=json_object,
        default={},
        help="TrainConfig fields for every training alike, as a JSON object, e.g. '{\"max_train_steps\": 200}' "
        "(default: none, the main job's budget; the benchmark sets " + ", ".join(SET_BY_THE_BENCHMARK) + " itself)",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the decodes are timed")
    add_output_arguments(
        parser,
        "benchmark_distillation.png",
        "where to save the held-out photos above the teacher's and each student's decodes",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda was given, but torch sees no CUDA device; use --device cpu.")
    for path in (args.output, args.image):
        if not path.parent.is_dir():
            parser.error(f"{path}: its folder {path.parent} does not exist")
    refuse_unknown_fields(parser, "--train_config", args.train_config, TrainConfig, SET_BY_THE_BENCHMARK)
    if args.teacher is not None:
        try:
            load_vae(args.teacher)  # refused here, before any training, if it is not a VAE folder
        except (OSError, ValueError, TypeError) as error:
            parser.error(f"--teacher {args.teacher}: {error}")
    students = list(dict.fromkeys(args.students))  # in the order given, once each
    fields = {**(QUICK_FIELDS if args.quick else {}), **args.train_config}
    plan = QUICK if args.quick else FULL

    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        try:
            configs = train_configs(fields, Path(workdir), args.teacher, students)
        except ValueError as error:  # TrainConfig's own checks of the values
            parser.error(f"--train_config: {error}")
        teacher_folder = args.teacher or configs["teacher"].output_dir
        results = run(configs, teacher_folder, plan, args.device, args.image)
    data = {
        **the_run(COMMAND, argv, start, args.device),
        "device": args.device,
        "load_average": results["load"],
        "budget": budget(next(iter(configs.values()))),
        "teacher_given": args.teacher,
        "autoencoder_kl_widths": CUSTOM_VAE_WIDTHS,
        "sd_widths": STABLE_DIFFUSION_WIDTHS,
        "labels": LABELS,
        "plan": dataclasses.asdict(plan),
        "targets": [dataclasses.asdict(target) for target in targets(results, plan)],
        **{key: results[key] for key in ("teacher", "students", "parameters", "decode_seconds", "large")},
        "image": os.path.relpath(args.image, args.results),  # as the results file links it
    }
    publish(SECTION, data, args.results, args.output)
    return results


if __name__ == "__main__":
    main()
