"""The output folder of a run: what the objective saves (`Objective.save`: the model, a grid, the model card), then
metrics.json and training_config.json; then the optional push to the Hub."""

import fnmatch
import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from ..hub import upload_folder_to_hub
from .checkpoints import CheckpointError, checkpoint_steps, latest_checkpoint, read_state, run_ids
from .config import RunConfig

# What every run writes into its output folder besides its checkpoint-{step} folders and what its objective saves
# (`Objective.output_patterns`): a new run never overwrites these unless told to.
OUTPUT_PATTERNS = ("README.md", "metrics.json", "training_config.json", "logs")


def check_output_dir(config: RunConfig, objective_patterns: tuple[str, ...] = ()):
    """Refuses, before anything is written, an `output_dir` that is a file or cannot be created, and one holding
    what the run would overwrite unless `overwrite_output_dir` says to replace it: for a new run, a user's README.md
    or an earlier run's model or checkpoints (`OUTPUT_PATTERNS` and the objective's); for a resume, any file of a
    folder that is neither the checkpoint's run's nor empty. (Another run's checkpoints are never replaced, even so:
    see `Checkpoints`.)"""
    output_dir = Path(config.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"--output_dir {output_dir} is a file; the model, checkpoints and logs need a folder.")
    existing = next(folder for folder in (output_dir.absolute(), *output_dir.absolute().parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is a file" if not existing.is_dir() else "is not writable"
        raise ValueError(f"--output_dir {output_dir} cannot be created: {existing} {problem}.")
    if not output_dir.is_dir() or config.overwrite_output_dir:
        return
    choice = config.resume_from_checkpoint
    resumed = None if not choice else latest_checkpoint(output_dir) if choice == "latest" else Path(choice)
    if resumed is not None:
        try:
            run_id = read_state(resumed)["run_id"]
        except (CheckpointError, OSError):
            return  # the resume names what is wrong with the checkpoint, before anything is written
        names = sorted(path.name for path in output_dir.iterdir())
        if run_id in run_ids(output_dir) or not names:
            return  # a resumed run rewrites what its earlier part wrote
        raise ValueError(
            f"--output_dir {output_dir} holds {', '.join(names[:6])}{' ...' if len(names) > 6 else ''} and no "
            f"checkpoint of the run {resumed} belongs to: resume into that run's folder or an empty one, or pass "
            "--overwrite_output_dir."
        )
    checkpoints = [f"checkpoint-{step}" for step in checkpoint_steps(output_dir)]
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


class WrittenFiles:
    """The files an export writes into `folder`, by name with the SHA-256 of their content as written: what a push
    uploads, exactly (a file changed since it was written stays home)."""

    def __init__(self, folder: Path):
        self.folder, self.hashes = Path(folder), {}
        self.folder.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, content: bytes):
        (self.folder / name).write_bytes(content)
        self.hashes[name] = hashlib.sha256(content).hexdigest()

    def save_with(self, save):
        """`save(folder)` (e.g. a model's `save_pretrained`) into a temporary folder beside the output, then each file
        moved in (subfolders too), so that what it wrote is known."""
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=".saving-") as temporary:
            save(temporary)
            for path in sorted(path for path in Path(temporary).rglob("*") if path.is_file()):
                name = path.relative_to(temporary).as_posix()
                self.hashes[name] = _sha256(path)
                (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, self.folder / name)

    def save_model(self, model):
        """`model.save_pretrained`, through `save_with`."""
        self.save_with(model.save_pretrained)

    def unchanged(self) -> tuple[list[str], list[str]]:
        """(names whose content is still as written, names changed or removed since)."""
        same = [name for name, digest in self.hashes.items() if (self.folder / name).is_file()
                and _sha256(self.folder / name) == digest]  # fmt: skip
        return sorted(same), sorted(set(self.hashes) - set(same))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def write_output_folder(model, objective, data, config: RunConfig, num_processes: int, throughput: dict) -> dict:
    """Writes the output folder (see the module docstring) and pushes it when `config.push_to_hub`; returns what
    metrics.json holds: the objective's held-out metrics and the training throughput."""
    output_dir = Path(config.output_dir)
    written = WrittenFiles(output_dir)
    model.eval()
    written.write("training_config.json", (json.dumps(config.to_json_dict(), indent=2) + "\n").encode())
    training = training_summary(config, objective, num_processes, throughput)
    metrics = objective.save(model, data, written, training)  # the model first, then its grid and card
    summary = {**metrics, "split": data.test_description, "images": len(data.test), **throughput}
    written.write("metrics.json", (json.dumps(summary, indent=2) + "\n").encode())
    print(
        f"Held-out {data.test_description}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float | int))
        + f". Saved to {output_dir}."
    )
    if data.skipped:
        print(f"Skipped {len(data.skipped)} unreadable image file(s), e.g. {data.skipped[0]}.")
    if config.push_to_hub:
        # Exactly what this export wrote, as it wrote it: never the user's other files in the folder, nor
        # checkpoints and logs, nor a file of ours that changed since.
        unchanged, changed = written.unchanged()
        if changed:
            print(f"Not pushing {', '.join(changed)}: changed or removed since this run wrote them.")
        repo_id = config.hub_model_id or output_dir.name
        url = upload_folder_to_hub(output_dir, repo_id, allow_patterns=[glob.escape(name) for name in unchanged])
        print(f"Pushed {', '.join(unchanged)} to {url}")
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
