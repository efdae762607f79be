"""Resumable checkpoints: `checkpoint-{step}` folders in the output folder, written atomically, pruned, resumed."""

import os
import shutil
from pathlib import Path

from accelerate import Accelerator


def checkpoint_steps(output_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in `output_dir`, oldest first."""
    names = (p.name for p in Path(output_dir).glob("checkpoint-*") if p.is_dir())
    return sorted(int(name.split("-")[1]) for name in names if name.split("-")[1].isdigit())


def latest_checkpoint(output_dir: Path) -> Path | None:
    steps = checkpoint_steps(output_dir)
    return Path(output_dir) / f"checkpoint-{steps[-1]}" if steps else None


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None):
    """Writes checkpoint-{step} atomically (into a temporary folder, then renamed), then prunes the oldest."""
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        for unfinished in output_dir.glob("checkpoint-*.partial"):  # left by a process killed while saving
            shutil.rmtree(unfinished)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # every rank writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)  # a kill before this line leaves only a .partial folder, never a broken latest
        for old in checkpoint_steps(output_dir)[: -total_limit or None] if total_limit else []:
            shutil.rmtree(output_dir / f"checkpoint-{old}")
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """Loads the checkpoint `resume_from_checkpoint` names ("latest": the newest in `output_dir`) into everything
    registered with accelerate; returns its folder, or `None` when there is nothing to resume."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            accelerator.print(f"No checkpoint in {output_dir}: starting a new run.")
            return None
    else:
        path = Path(resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such checkpoint folder.")
    accelerator.load_state(str(path))
    return path
