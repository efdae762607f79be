"""The output folder of a run: what the objective saves (`Objective.save`: the model, a grid, the model card), then
metrics.json and training_config.json; then the optional push to the Hub."""

import fnmatch
import json
import time
from pathlib import Path

import torch

from ..hub import upload_folder_to_hub
from .checkpoints import checkpoint_steps
from .config import RunConfig

# What every run writes into its output folder besides its checkpoint-{step} folders and what its objective saves
# (`Objective.output_patterns`): a new run never overwrites these unless told to.
OUTPUT_PATTERNS = ("README.md", "metrics.json", "training_config.json", "logs")


def check_output_dir(config: RunConfig, objective_patterns: tuple[str, ...] = ()):
    """Refuses, before anything is written, an `output_dir` that is a file, and one holding what a new run would
    overwrite (a user's README.md, an earlier run's model or checkpoints: `OUTPUT_PATTERNS` and the objective's)
    unless the run resumes or `overwrite_output_dir` says to replace them."""
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file; the model, checkpoints and logs need a folder.")
    if not output_dir.is_dir() or config.overwrite_output_dir:
        return
    checkpoints = [f"checkpoint-{step}" for step in checkpoint_steps(output_dir)]
    if config.resume_from_checkpoint and (checkpoints or config.resume_from_checkpoint != "latest"):
        return  # a resumed run rewrites what its earlier part wrote
    names = sorted(path.name for path in output_dir.iterdir())
    patterns = (*OUTPUT_PATTERNS, *objective_patterns)
    clashes = [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    clashes += checkpoints
    if clashes:
        resume = "continue that run with --resume_from_checkpoint latest, " if checkpoints else ""
        raise ValueError(
            f"--output_dir {output_dir} already holds {', '.join(clashes[:6])}{' ...' if len(clashes) > 6 else ''}, "
            f"which a new run would overwrite: {resume}choose another --output_dir, or pass --overwrite_output_dir."
        )


@torch.no_grad()
def write_output_folder(model, objective, data, config: RunConfig, num_processes: int, throughput: dict) -> dict:
    """Writes the output folder (see the module docstring) and pushes it when `config.push_to_hub`; returns what
    metrics.json holds: the objective's held-out metrics and the training throughput."""
    output_dir = Path(config.output_dir)
    started = time.time_ns()
    model.eval()
    training = training_summary(config, objective, num_processes, throughput)
    metrics = objective.save(model, data, output_dir, training)  # the model first, then its grid and card
    summary = {**metrics, "split": data.test_description, "images": len(data.test), **throughput}
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "training_config.json").write_text(json.dumps(config.to_json_dict(), indent=2) + "\n")
    print(
        f"Held-out {data.test_description}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        + f". Saved to {output_dir}."
    )
    if data.skipped:
        print(f"Skipped {len(data.skipped)} unreadable image file(s), e.g. {data.skipped[0]}.")
    if config.push_to_hub:
        # Only what this export wrote: never the user's other files in the folder, nor checkpoints and logs.
        written = sorted(
            path.relative_to(output_dir).as_posix()
            for path in output_dir.rglob("*")  # an objective may save folders (a pipeline's transformer/, vae/...)
            if path.is_file()
            and path.stat().st_mtime_ns >= started
            and not path.relative_to(output_dir).parts[0].startswith(("checkpoint-", "logs"))
        )
        repo_id = config.hub_model_id or output_dir.name
        url = upload_folder_to_hub(output_dir, repo_id, allow_patterns=written)
        print(f"Pushed {', '.join(written)} to {url}")
    return summary


def training_summary(config: RunConfig, objective, num_processes: int, throughput: dict) -> str:
    """The model card's "Training" paragraph."""
    steps = config.max_train_steps or f"{config.num_train_epochs} epochs"
    speed = ""
    if throughput["train_steps"]:
        minutes, images_per_second = throughput["train_seconds"] / 60, throughput["train_images_per_second"]
        speed = f" The last run took {minutes:.1f} min of steps ({images_per_second:.1f} images/s)."
    height, width = config.resolution
    return (
        f"Trained with `diffusers_custom_vae.training.train` for {steps} steps of "
        f"{config.images_per_step * num_processes} images at {height}x{width} on {num_processes} process(es): "
        f"{objective.description}; AdamW, learning rate {config.learning_rate} ({config.lr_scheduler}), seed "
        f"{config.seed}{', EMA weights' if config.use_ema else ''}. The full settings are in `training_config.json`."
        f"{speed}"
    )
