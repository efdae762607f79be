"""BENCHMARKS.md, rendered from the results the benchmarks save: the benchmarks write data, this module writes prose.

    python -m benchmarks.render [--results benchmarks/results] [--output BENCHMARKS.md]

Each benchmark saves its numbers as benchmarks/results/<benchmark>.json (through `publish`, which then re-renders
BENCHMARKS.md); the renderer turns every results file into a section, in the order of `SECTIONS`. A results file holds
a JSON object with what every section shows:

    date, wall_seconds, command, machine   the run: when, how long, the command line, `report.machine_description`
    targets                                [`report.Target` fields]: what the models are built to reach, as checked
    image                                  (optional) a PNG, relative to the results folder
    note                                   (optional) anything a reader must know about these numbers

and the benchmark's own numbers. tests/test_benchmarks.py checks that BENCHMARKS.md is what this module makes of the
committed results.

Adding a benchmark `benchmark_NAME`:

1. In benchmarks/benchmark_NAME.py, give the command line `--results` and `--output` (as benchmark_training.py
   does), put the numbers in a dict with the common keys above (`report.the_run(...)` gives the first four, and
   `dataclasses.asdict` a `Target`), and end `main` with `publish("benchmark_NAME", data, args.results, args.output)`.
2. Here, write `NAME_section(data) -> list[str]`, its markdown lines from that dict (`about_the_run`, `targets`,
   `table`, `columns`, `number` and `ratio` do the common parts), and add `"benchmark_NAME": NAME_section` to
   `SECTIONS`.
3. Run it once in full, and commit benchmarks/results/benchmark_NAME.json and BENCHMARKS.md.
"""

import argparse
import json
import os
from pathlib import Path

from .report import Target

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
OUTPUT = REPO / "BENCHMARKS.md"
TITLE = (
    "# Benchmarks\n\nRendered by `python -m benchmarks.render` from the results the benchmarks save in "
    "`benchmarks/results/`: rerun a benchmark to refresh its section."
)


# The parts every section shares.


def number(value, digits: int) -> str:
    """A number to `digits` decimals; anything else (a string saying why there is no number) as it is."""
    return f"{value:.{digits}f}" if isinstance(value, float | int) else str(value)


def ratio(mine, theirs, digits: int = 2) -> str:
    """mine / theirs, or "-" where either is not a number."""
    return number(mine / theirs, digits) if all(isinstance(v, float | int) for v in (mine, theirs)) else "-"


def columns(record: dict, *keys_and_digits) -> list[str]:
    """Cells of `record`'s values: ("psnr", 2), ("ssim", 4), ... ("-" where a key is missing)."""
    return [number(record.get(key, "-"), digits) for key, digits in keys_and_digits]


def table(header: str, rows: list[list[str]]) -> list[str]:
    """A markdown table: `header` as "name | name | ...", then the rows' cells."""
    width = header.count("|") + 1
    return [f"| {header} |", "|" + "---|" * width, *("| " + " | ".join(row) + " |" for row in rows)]


def about_the_run(data: dict, machine: str = "") -> list[str]:
    """The run's bullets: date and wall time, command, machine (`machine` appended), and the note if there is one."""
    lines = [
        f"- Date: {data['date']}; wall time {data['wall_seconds'] / 60:.1f} min",
        f"- Command: `{data['command']}`",
        f"- Machine: {data['machine']}{machine}",
    ]
    return lines + ([f"- Note: {data['note']}"] if data.get("note") else [])


def targets(data: dict) -> list[str]:
    return [Target(**target).markdown() for target in data["targets"]]


def budget_in_words(budget: dict, steps: int) -> str:
    """A training budget (`report.budget`), up to its loss."""
    height, width = budget["resolution"]
    return (
        f"{steps} steps of {budget['train_batch_size']} images at {height}x{width}, learning rate "
        f"{budget['learning_rate']} ({budget['lr_scheduler']}, {budget['lr_warmup_steps']} warm-up steps)"
    )


def peak_memory_in_words(device: str, what: str, it: str) -> str:
    """How peak memory was measured during `what` ("the decodes", referred to as `it`: "them")."""
    if device == "cuda":
        return f"torch.cuda.max_memory_allocated during {what} minus torch.cuda.memory_allocated before {it}"
    return (
        f"the process's peak resident set size during {what} (VmHWM, reset just before {it}) minus its resident set "
        f"size just before {it}"
    )


def autoencoder_kl_in_words(widths: list[int]) -> str:
    return f"block_out_channels {tuple(widths)}, 4 Down/UpDecoderBlock2D, layers_per_block 2, 4 latent channels"


# One function per benchmark: its section's markdown lines, from its results.

VAE_MODELS = ("CustomVAE", "tutorial", "AutoencoderKL")
VAE_COLUMNS = "CustomVAE | tutorial | AutoencoderKL | CustomVAE / AutoencoderKL | CustomVAE / tutorial"


def vae_section(data: dict) -> list[str]:
    plan, millions = data["plan"], {name: count / 1e6 for name, count in data["parameters"].items()}

    def rows(cases: dict[tuple, dict], value=float, digits: int = 2) -> list[list[str]]:
        """{labels: {model: measurement}} -> rows: the labels, the models' values, CustomVAE's ratios to the others."""
        found = []
        for labels, case in cases.items():
            values = {name: case[name] if isinstance(case[name], str) else value(case[name]) for name in VAE_MODELS}
            ratios = [ratio(values["CustomVAE"], values[other]) for other in ("AutoencoderKL", "tutorial")]
            found.append([*labels, *(number(values[name], digits) for name in VAE_MODELS), *ratios])
        return found

    train = {(f"{side} px", str(batch)): data["train"][side] for side, batch in plan["train"].items()}
    inference = {
        (operation, f"{side} px", str(batch)): data[operation][side]
        for operation in ("encode", "decode")
        for side, batch in plan["inference"].items()
    }
    large = {
        (f"{side}x{side}", tiling): case for side, cases in data["large"].items() for tiling, case in cases.items()
    }
    baselines = [
        f"{name} {max(case[name]['baseline_gb'] for case in large.values() if isinstance(case[name], dict)):.2f} GB"
        for name in VAE_MODELS
    ]
    return [
        "## VAE: CustomVAE vs the tutorial's VAE vs AutoencoderKL (`benchmarks/benchmark_vae.py`)",
        "",
        *about_the_run(data, f"; device {data['device']}, float32"),
        "- Load average (1 min) before / after the run: {before:.2f} / {after:.2f} ".format(**data["load_average"])
        + "(other work on the machine makes the timings slower and noisier)",
        f"- Models, with random weights and inputs: `CustomVAE()`, the default config ({millions['CustomVAE']:.2f} M "
        "parameters); tutorial: `benchmarks.tutorial.VAE`, explicit softmax attention "
        f"({millions['tutorial']:.2f} M); `AutoencoderKL` with block_out_channels "
        f"{tuple(data['autoencoder_kl_widths'])}, 4 DownEncoderBlock2D / UpDecoderBlock2D, layers_per_block 2, "
        f"latent_channels 4, norm_num_groups 32 ({millions['AutoencoderKL']:.2f} M)",
        f"- Timing: `torch.utils.benchmark`, in {plan['rounds']} round(s) in which the models take turns (a change in "
        "the machine's load falls on all of them alike); each turn is one untimed warm-up call, then timed calls "
        f"for at least {plan['min_run_time']:g} s, at least one (`Timer.blocked_autorange`). Each figure is the "
        "median of the timed calls. Large decodes: one warm-up decode, then one timed.",
        "",
        "### Targets",
        "",
        "What CustomVAE is built to reach, checked on this run's numbers:",
        "",
        *targets(data),
        "",
        "### Training step, images/s (higher is better)",
        "",
        "One step: encode, sample the posterior, decode, L1 + 1e-6 KL loss, backward, AdamW.",
        "",
        *table(f"resolution | batch | {VAE_COLUMNS}", rows(train)),
        "",
        "### Inference, images/s (higher is better)",
        "",
        "Under `torch.no_grad()`: encode gives the posterior's moments, decode the image.",
        "",
        *table(f"operation | resolution | batch | {VAE_COLUMNS}", rows(inference)),
        "",
        "### Decoding one large image: seconds (lower is better)",
        "",
        f"Each case runs in a process of its own: one warm-up decode, then one timed. Tiling: {plan['tile']} px "
        f"tiles (`enable_tiling()`); CustomVAE overlaps them by {plan['tile'] // 8} px, AutoencoderKL by a quarter of "
        "a tile (its fixed `tile_overlap_factor`). The tutorial has no tiling.",
        "",
        *table(f"image | tiling | {VAE_COLUMNS}", rows(large, lambda case: case["seconds"], 1)),
        "",
        "### Decoding one large image: peak memory, GB (lower is better)",
        "",
        f"Peak memory: {peak_memory_in_words(data['device'], 'the decodes', 'them')}. Baseline (imports, model and "
        f"latents loaded): {', '.join(baselines)}.",
        "",
        *table(f"image | tiling | {VAE_COLUMNS}", rows(large, lambda case: case["peak_gb"])),
    ]


# What `train` returns, as the tables show it: held-out metrics, training speed, (for a student) fidelity.
TRAINED = (("psnr", 2), ("ssim", 4), ("ms_ssim", 4))
SPEED = (("train_images_per_second", 2), ("train_minutes", 1))
FIDELITY = (("student_vs_teacher_psnr", 2), ("teacher_decodes_student_psnr", 2), ("latent_relative_error", 3))


def with_minutes(record: dict) -> dict:
    """`train`'s results, with their seconds of training steps in minutes (where they have them)."""
    return record | ({"train_minutes": record["train_seconds"] / 60} if "train_seconds" in record else {})


def training_section(data: dict) -> list[str]:
    models, budget = data["models"], data["budget"]
    ours, theirs = models["CustomVAE"], models["AutoencoderKL"]
    rows = [[name, *columns(with_minutes(result), *TRAINED, *SPEED)] for name, result in models.items()]
    ratios = [ratio(ours[key], theirs[key], 3) for key in ("ssim", "ms_ssim")]
    speed = ratio(ours["train_images_per_second"], theirs["train_images_per_second"])
    rows.append(["CustomVAE / AutoencoderKL", f"{ours['psnr'] - theirs['psnr']:+.2f} dB", *ratios, speed, ""])
    return [
        "## The main job: CustomVAE vs AutoencoderKL, same trainer, same budget (`benchmarks/benchmark_training.py`)",
        "",
        *about_the_run(data),
        f"- Training: {budget_in_words(budget, ours['train_steps'])}, {budget['rec_loss']} + KL {budget['kl_scale']}"
        f", seed {budget['seed']}: the defaults of `python examples/train_vae.py` unless the command says otherwise.",
        f"- Held-out: {ours['split']}; reconstructions decoded from the posterior's mode.",
        f"- AutoencoderKL: {autoencoder_kl_in_words(data['autoencoder_kl_widths'])}: the widths of CustomVAE's "
        "default config.",
        "",
        "Target: CustomVAE reconstructs at least as well as diffusers' own architecture of the same width given the "
        "same training.",
        "",
        *targets(data),
        "",
        *table("model | PSNR (dB) | SSIM | MS-SSIM | training images/s | minutes of steps", rows),
        "",
        "The held-out photos (top), CustomVAE's reconstructions, then AutoencoderKL's:",
        "",
        f"![held-out photos and their reconstructions]({data['image_link']})",
    ]


def distillation_section(data: dict) -> list[str]:
    students, parameters, budget, plan = data["students"], data["parameters"], data["budget"], data["plan"]
    labels, sd = data["labels"], "sd_architecture"  # labels: {model: its name in prose}
    first = next(iter(students.values()))
    if data["teacher_given"]:
        teacher_line = f"given: `{data['teacher_given']}`"
    else:
        teacher_line = (
            f"an `AutoencoderKL` with {autoencoder_kl_in_words(data['autoencoder_kl_widths'])} (CustomVAE's widths), "
            "trained by the same trainer on the same photos with the same budget"
        )
    # The teacher's row: its PSNR is its reconstruction's, as the students' metrics record it; it has no training
    # figures when it was given, and no fidelity to itself but its decode of its own latents.
    psnr = first["teacher_psnr"]
    teacher = (data["teacher"] or {}) | {"psnr": psnr, "teacher_decodes_student_psnr": psnr}
    fidelity = [
        [labels[name], *columns(with_minutes(metrics), *TRAINED, *FIDELITY, *SPEED)]
        for name, metrics in {"teacher": teacher, **students}.items()
    ]
    seconds = data["decode_seconds"]
    speed = [
        [labels[name], number(parameters[name] / 1e6, 2), number(seconds[name], 3)]
        + [ratio(seconds[other], seconds[name]) for other in ("teacher", sd)]
        for name in seconds
    ]
    large = data["large"]
    large_rows = []
    for name in (name for name in labels if name in next(iter(large.values()))):
        cells = []
        for cases in large.values():
            case, sd_seconds = cases[name], cases[sd]["seconds"] if isinstance(cases[sd], dict) else "-"
            if isinstance(case, str):
                cells += [case, "-", "-"]
            else:
                cells += [*columns(case, ("seconds", 2), ("peak_gb", 2)), ratio(sd_seconds, case["seconds"])]
        large_rows.append([labels[name], *cells])
    large_columns = " | ".join(f"{s}x{s}: seconds | {s}x{s}: peak GB | {s}x{s}: SD's time / model's" for s in large)
    side = plan["speed_side"]
    return [
        "## Distillation: CustomVAE students in an AutoencoderKL's latent space "
        "(`benchmarks/benchmark_distillation.py`)",
        "",
        *about_the_run(data, f"; decodes on {data['device']}, float32"),
        "- Load average (1 min): "
        + ", ".join(f"{when} {value:.2f}" for when, value in data["load_average"].items())
        + " (other work on the machine slows the timings and adds noise; the models took turns, so ratios measured "
        "in this run are what count)",
        f"- Training budget, for each model, on the embedded photos: {budget_in_words(budget, first['train_steps'])}"
        f", {budget['rec_loss']}, seed {budget['seed']}: the defaults of `python examples/train_vae.py` unless "
        "the command says otherwise.",
        f"- Teacher: {teacher_line}.",
        "- Students: distilled by `train(TrainConfig(teacher_vae=...))` (`--teacher_vae`): latent regression onto the "
        f"teacher's posterior ({budget['latent_scale']}), {budget['rec_loss']} reconstruction of the images from "
        "latents sampled from the teacher's posterior; "
        + "; ".join(f"{labels[name]}: {parameters[name] / 1e6:.2f} M decoder parameters" for name in students)
        + ".",
        f"- SD's VAE architecture: `AutoencoderKL` with block_out_channels {tuple(data['sd_widths'])}, the VAE of "
        f"Stable Diffusion 1.x/2.x and SDXL ({parameters[sd] / 1e6:.1f} M decoder parameters), random weights: "
        "timed only.",
        f"- Held-out: {first['split']}; metrics by `evaluate_distillation`, from the posteriors' modes.",
        "",
        "### Targets",
        "",
        *targets(data),
        "",
        "### Fidelity on the held-out photos",
        "",
        "PSNR against the originals of each model's decode of the teacher's latents; then the student's decode "
        "against the teacher's decode of the same latents; the teacher's decode of the model's own latents (for the "
        "teacher: its reconstruction); encoder agreement: |student latents - teacher latents| / |teacher latents|.",
        "",
        *table(
            "model | PSNR (dB) | SSIM | MS-SSIM | vs the teacher's decode (dB) | teacher decodes its latents (dB) | "
            "latent relative error | training images/s | minutes of steps",
            fidelity,
        ),
        "",
        f"### Decoding one {side}x{side} image: seconds (lower is better)",
        "",
        f"Random latents, under `torch.no_grad()`; `torch.utils.benchmark` in {plan['rounds']} round(s) in which the "
        "models take turns, each turn one untimed warm-up call, then timed calls for at least "
        f"{plan['min_run_time']:g} s (at least one); the median of the timed calls.",
        "",
        *table(
            "model | decoder parameters (M) | seconds | teacher's time / model's | SD architecture's time / model's",
            speed,
        ),
        "",
        "### Decoding one image in a process of its own: seconds and peak memory (lower is better)",
        "",
        f"One untimed {plan['warmup_side']} px warm-up decode, then one timed decode. Peak memory: "
        f"{peak_memory_in_words(data['device'], 'the decode', 'it')} (imports, model and latents loaded).",
        "",
        *table(f"model | {large_columns}", large_rows),
        "",
        "Held-out photos (top), the teacher's decode of their latents, then each student's decode of the same latents "
        f"({', '.join(labels[name] for name in students)}):",
        "",
        f"![held-out photos, the teacher's and the students' decodes]({data['image_link']})",
    ]


def latent_diffusion_section(data: dict) -> list[str]:
    speed, vaes, dits = data["throughput"], data["vaes"], data["dits"]
    vae_budget, dit_budget = data["vae_budget"], data["diffusion_budget"]
    first_vae, first_dit = next(iter(vaes.values())), next(iter(dits.values()))
    side = dit_budget["resolution"][0]
    speed_rows = [[name, number(value, 2)] for name, value in speed["images_per_second"].items()]
    space_rows = [
        [name, *columns(vaes[name], ("psnr", 2)), *columns(dit, ("latent_std", 3), ("held_out_loss", 4))]
        + [number(dit["fid"], 1) if dit.get("fid") is not None else "skipped", *columns(with_minutes(dit), *SPEED)]
        for name, dit in dits.items()
    ]
    fid_notes = sorted({dit["fid_note"] for dit in dits.values()})
    best = min(dits, key=lambda name: dits[name]["held_out_loss"])
    return [
        "## Latent diffusion: the latent cache, and which latent space diffuses better "
        "(`benchmarks/benchmark_latent_diffusion.py`)",
        "",
        *about_the_run(data, f"; device {data['device']}, float32"),
        "",
        "### Targets",
        "",
        *targets(data),
        "",
        f"### Training a DiT with the latent cache vs encoding every batch, {speed['resolution']} px: images/s",
        "",
        f"The tiny DiT preset ({speed['dit_parameters'] / 1e6:.2f} M parameters) on latents "
        f"{'x'.join(map(str, speed['latent_shape']))} of the default CustomVAE ({speed['vae_parameters'] / 1e6:.2f} M "
        f"parameters, random weights); batch {speed['batch_size']}; `LatentDiffusionObjective.loss`, backward, AdamW. "
        "The encoding path gets its images decoded and cropped in advance: it is charged for the VAE alone. The steps "
        "take turns, so the machine's load falls on both alike. Filling the cache (once, with flipped images: two "
        f"encodings per image) ran at {speed['cache_images_per_second']:.2f} images/s.",
        "",
        *table("training step | images/s", speed_rows),
        "",
        "### Equal-budget DiTs on the latents of CustomVAE and of an equal-width AutoencoderKL",
        "",
        f"- VAEs: CustomVAE and an `AutoencoderKL` with {autoencoder_kl_in_words(data['autoencoder_kl_widths'])}, "
        "each trained by the same trainer on the embedded photos: "
        f"{budget_in_words(vae_budget, first_vae['train_steps'])}, {vae_budget['rec_loss']} + KL "
        f"{vae_budget['kl_scale']}, seed {vae_budget['seed']} (the first main job's budget unless the command says "
        "otherwise); each VAE's `scaling_factor` estimated on the data by the trainer.",
        f"- DiTs: `--model_config {dit_budget['model_config']}`, {first_dit['train_steps']} steps of "
        f"{dit_budget['train_batch_size']} latents of {side}x{side} images, learning rate "
        f"{dit_budget['learning_rate']}, EMA {'on' if dit_budget['use_ema'] else 'off'}, seed {dit_budget['seed']} "
        "(the second main job's budget unless the command says otherwise).",
        "- Held-out denoising loss: epsilon-prediction MSE at fixed noise and timesteps on the held-out images' "
        "latents (in units of the noise, so comparable across latent spaces scaled to unit variance); latent std: "
        "the scaled latents' standard deviation on the training data (1 is what the noise schedule assumes).",
        f"- {'; '.join(fid_notes)}",
        "",
        *table(
            "latent space of | VAE's held-out PSNR (dB) | latent std | held-out denoising loss | FID | "
            "training images/s | minutes of steps",
            space_rows,
        ),
        "",
        f"Lowest held-out denoising loss: the DiT on {best}'s latents "
        "(" + ", ".join(f"{name} {dit['held_out_loss']:.4f}" for name, dit in dits.items()) + ").",
        "",
        f"Samples, one row per class (guidance {dit_budget['guidance_scale']}, {dit_budget['num_inference_steps']} "
        "DDIM steps, fixed seeds): the DiT on CustomVAE's latents (left) and on AutoencoderKL's (right):",
        "",
        f"![samples of the DiTs on each latent space]({data['image_link']})",
    ]


# In the order BENCHMARKS.md shows them.
SECTIONS = {
    "benchmark_vae": vae_section,
    "benchmark_training": training_section,
    "benchmark_distillation": distillation_section,
    "benchmark_latent_diffusion": latent_diffusion_section,
}


# Reading results, writing BENCHMARKS.md.


def load_results(text: str, path: Path, output: Path) -> dict:
    """The results file at `path` (its `text`), with `image_link`: its image as `output` (the markdown) links it."""
    data = json.loads(text)
    if data.get("image"):
        data["image_link"] = os.path.relpath(path.parent / data["image"], output.parent)
    return data


def section(name: str, data: dict) -> str:
    if name not in SECTIONS:
        raise ValueError(f"{name}: no section renders these results; add one to benchmarks/render.py's SECTIONS.")
    return "\n".join(SECTIONS[name](data))


def render(results: Path = RESULTS, output: Path = OUTPUT) -> str:
    """The markdown of BENCHMARKS.md (to be written at `output`): a section for each results file in `results`."""
    found = {path.stem: path for path in sorted(Path(results).glob("*.json"))}
    if unknown := sorted(set(found) - set(SECTIONS)):
        raise ValueError(f"{', '.join(unknown)} in {results}: no section renders these results (see SECTIONS).")
    sections = [
        section(name, load_results(found[name].read_text(), found[name], Path(output)))
        for name in SECTIONS
        if name in found
    ]
    return "\n\n".join([TITLE, *sections]) + "\n"


def publish(name: str, data: dict, results: Path = RESULTS, output: Path = OUTPUT) -> None:
    """Saves a benchmark's results as `results`/`name`.json, prints its section, and re-renders `output` from every
    results file in `results`. The section is printed first: a file that cannot be written loses nothing."""
    path = Path(results) / f"{name}.json"
    text = json.dumps(data, indent=2) + "\n"
    print(section(name, load_results(text, path, Path(output))))
    Path(results).mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    Path(output).write_text(render(results, output))
    print(f"\nSaved {os.fspath(path)}; rendered {os.fspath(output)}")


def add_output_arguments(parser: argparse.ArgumentParser, image: str | None = None, image_help: str = ""):
    """A benchmark's --results and --output (and, given an `image` name, --image: a PNG in benchmarks/ by default)."""
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of results files (default: %(default)s)")
    parser.add_argument(
        "--output", type=Path, default=OUTPUT, help="markdown rendered from --results (default: %(default)s)"
    )
    if image:
        parser.add_argument("--image", type=Path, default=REPO / "benchmarks" / image, help=image_help)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.render", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder of results files (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="markdown file to write (default: %(default)s)")
    args = parser.parse_args(argv)
    args.output.write_text(render(args.results, args.output))
    print(f"Rendered {os.fspath(args.output)} from {os.fspath(args.results)}")


if __name__ == "__main__":
    main()
