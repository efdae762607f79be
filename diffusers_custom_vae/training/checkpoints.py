"""Resumable checkpoints: `checkpoint-{step}` folders in the output folder, written atomically, pruned, resumed.

Nothing in a checkpoint is unpickled on resume, so a checkpoint folder from someone else cannot run code: models are
safetensors, the run's position is JSON, and optimiser, scheduler, EMA and RNG states are tensors and plain numbers
read back with `torch.load(weights_only=True)`. A checkpoint records the run that wrote it: pruning touches only
this run's checkpoints and never the one just written, and a resume says when the folder holds other runs' too.

    checkpoint-{step}/
        trainer_state.json           run id, step, epoch, batches consumed in the epoch, the objective's facts
        {name}.safetensors           each trained module: "model", and e.g. "discriminator"
        {name}.pt                    each optimiser, the scheduler, the EMA weights, the fp16 gradient scaler
        rng_state_{rank}.pt          each process's Python, numpy and torch (CPU and CUDA) generator states
"""

import json
import os
import pickle
import random
import re
import shutil
import time
from pathlib import Path

import numpy as np
import safetensors.torch
import torch
from accelerate import Accelerator

from ..modeling_custom_vae import unsafe_pickle_globals

# The trainer's own names: a user's "checkpoint-2-old" or "checkpoint-002" is not one (no leading zeros).
CHECKPOINT_NAME = re.compile(r"checkpoint-(0|[1-9]\d*)")
PARTIAL_NAME = re.compile(r"checkpoint-(0|[1-9]\d*)\.partial")
STATE_FILE = "trainer_state.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: damaged, from another format, or refused for safety."""


def checkpoint_steps(output_dir: str | os.PathLike) -> list[int]:
    """Steps of the complete checkpoint folders in `output_dir` (the trainer's names only), oldest first."""
    folders = Path(output_dir).iterdir() if Path(output_dir).is_dir() else []
    return sorted(int(match[1]) for p in folders if p.is_dir() and (match := CHECKPOINT_NAME.fullmatch(p.name)))


def read_state(folder: Path) -> dict:
    """A checkpoint's `trainer_state.json`, or `CheckpointError` naming what is wrong with it."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        pickles = sorted(p.name for p in Path(folder).glob("*.pkl")) + sorted(
            p.name for p in Path(folder).glob("*.bin")
        )
        kind = (
            f"it holds pickled files ({', '.join(pickles[:3])}), which are never loaded: they could run code"
            if pickles
            else f"it has no {STATE_FILE}"
        )
        raise CheckpointError(f"{folder} was not written by this version of the trainer: {kind}.")
    try:
        state = json.loads(path.read_text())
        return {"run_id": str(state["run_id"]), "step": int(state["step"]), **state}
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {error}).") from error


def run_ids(output_dir: str | os.PathLike) -> set[str]:
    """The runs whose checkpoints `output_dir` holds (those whose state reads)."""
    ids = set()
    for step in checkpoint_steps(output_dir):
        try:
            ids.add(read_state(Path(output_dir) / f"checkpoint-{step}")["run_id"])
        except CheckpointError:
            continue
    return ids


def refuse_changes(kind: str, recorded: dict, current: dict, folder: Path):
    """Raises `CheckpointError` naming each of `current`'s values that differs from the checkpoint's `recorded` one
    (`kind`: what they are, e.g. "model config")."""
    changed = [
        f"{name} {current[name]!r} (the checkpoint's: {recorded[name]!r})"
        for name in recorded
        if name in current and _plain(recorded[name]) != _plain(current[name])
    ]
    if changed:
        raise CheckpointError(
            f"This run differs from {folder} in its {kind}: {'; '.join(changed)}. Resume with the checkpoint's, or "
            "start a new run (another --output_dir) to change it."
        )


def _plain(value):
    """JSON's view of a value: tuples and lists compare equal, as a record read back has only lists."""
    return json.loads(json.dumps(value))


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The most recently written checkpoint in `output_dir`, by the time it records (not its step: an earlier,
    longer run's checkpoint-100 is not this run's latest). A folder whose state cannot be read counts by its
    modification time, so a resume names its damage instead of passing over it."""
    folders = [Path(output_dir) / f"checkpoint-{step}" for step in checkpoint_steps(output_dir)]

    def written_at(folder: Path) -> float:
        try:
            return float(read_state(folder).get("written_at", folder.stat().st_mtime))
        except CheckpointError:
            return folder.stat().st_mtime

    return max(folders, key=written_at, default=None)


def other_runs_checkpoints(output_dir: str | os.PathLike, run_id: str, readable_only: bool = False) -> list[str]:
    """Names of the checkpoint folders in `output_dir` that another run wrote (and, unless `readable_only`, those
    whose state cannot be read)."""
    others = []
    for step in checkpoint_steps(output_dir):
        try:
            if read_state(Path(output_dir) / f"checkpoint-{step}")["run_id"] == run_id:
                continue
        except CheckpointError:
            if readable_only:
                continue
        others.append(f"checkpoint-{step}")
    return others


class Checkpoints:
    """The checkpoints of one run in `output_dir`: `save` writes one, `load` restores one into the run's parts.

    Args:
        accelerator (`Accelerator`): The run's; every process writes and reads its own RNG state.
        output_dir (`Path`): Where the `checkpoint-{step}` folders go.
        run_id (`str`): This run's identity, recorded in each checkpoint (a resumed run takes its checkpoint's).
        total_limit (`int`, *optional*): Keep at most this many of this run's checkpoints.
    """

    def __init__(self, accelerator: Accelerator, output_dir: Path, run_id: str, total_limit: int | None = None):
        self.accelerator, self.output_dir, self.run_id, self.total_limit = (
            accelerator,
            Path(output_dir),
            run_id,
            total_limit,
        )

    def refuse_others_in_the_way(self, first_step: int, last_step: int):
        """Refuses, before training, a run whose steps after `first_step` up to `last_step` could save a checkpoint
        over another run's (a stop saves at any step): another run's checkpoints are never replaced."""
        others = other_runs_checkpoints(self.output_dir, self.run_id, readable_only=True)
        in_the_way = [name for name in others if first_step < int(CHECKPOINT_NAME.fullmatch(name)[1]) <= last_step]
        if in_the_way:
            raise CheckpointError(
                f"--output_dir {self.output_dir} holds another run's {', '.join(in_the_way[:4])}, which this run "
                f"(steps {first_step + 1} to {last_step}) could replace: choose another --output_dir, or move them."
            )

    def save(self, step: int, modules: dict, states: dict, trainer_state: dict):
        """Writes checkpoint-{step}: into `checkpoint-{step}.partial`, renamed when complete (a process killed while
        saving leaves no broken checkpoint), then prunes this run's oldest.

        `modules`: {name: module, maybe wrapped by accelerate}; `states`: {name: object with `state_dict()`};
        `trainer_state`: JSON-serialisable facts of the run (step, epoch...)."""
        accelerator = self.accelerator
        final, partial = self.output_dir / f"checkpoint-{step}", self.output_dir / f"checkpoint-{step}.partial"
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for unfinished in self.output_dir.iterdir():  # left by a process killed while saving
                if unfinished.is_dir() and PARTIAL_NAME.fullmatch(unfinished.name):
                    shutil.rmtree(unfinished)
            partial.mkdir(parents=True)
            for name, module in modules.items():
                weights = accelerator.get_state_dict(module)
                safetensors.torch.save_file(
                    {k: v.contiguous() for k, v in weights.items()}, partial / f"{name}.safetensors"
                )
            for name, state in states.items():
                torch.save(state.state_dict(), partial / f"{name}.pt")
            state = {"run_id": self.run_id, **trainer_state, "written_at": time.time()}
            (partial / STATE_FILE).write_text(json.dumps(state, indent=2) + "\n")
        accelerator.wait_for_everyone()
        torch.save(_rng_state(), partial / f"rng_state_{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.is_dir():  # this run's own, from before a resume at an earlier step, or a damaged one: replaced
                if final.name in other_runs_checkpoints(self.output_dir, self.run_id, readable_only=True):
                    raise CheckpointError(f"{final} belongs to another run: it is never replaced.")
                shutil.rmtree(final)
            os.replace(partial, final)  # a kill before this line leaves only a .partial folder, never a broken latest
            self._prune(keep=final)
        accelerator.wait_for_everyone()

    def _prune(self, keep: Path):
        """Deletes this run's oldest checkpoints beyond `total_limit`, never `keep` (the one just written) and never
        another run's."""
        if not self.total_limit:
            return
        ours = []
        for step in checkpoint_steps(self.output_dir):
            folder = self.output_dir / f"checkpoint-{step}"
            try:
                if folder != keep and read_state(folder)["run_id"] == self.run_id:
                    ours.append(folder)
            except CheckpointError:
                continue  # not this run's to touch
        for folder in ours[: max(0, len(ours) - (self.total_limit - 1))]:
            shutil.rmtree(folder)

    def load(self, folder: Path, modules: dict, states: dict, check=None) -> dict:
        """Restores `modules` and `states` (as given to `save`) and this process's RNG states from `folder`; returns
        its trainer state, which `check(trainer_state, folder)` may refuse first. Raises `CheckpointError` naming the
        damaged file and an earlier intact checkpoint."""
        try:
            trainer_state = read_state(folder)
        except CheckpointError as error:
            raise CheckpointError(f"{error} {self._intact_before(folder)}") from error
        if check is not None:
            check(trainer_state, folder)
        try:
            for name, module in modules.items():
                weights = safetensors.torch.load_file(folder / f"{name}.safetensors")
                if not _finite(weights):
                    raise CheckpointError(f"{folder / name}.safetensors holds non-finite weights.")
                self.accelerator.unwrap_model(module).load_state_dict(weights)
            for name, state in states.items():
                state.load_state_dict(_load_tensors(folder / f"{name}.pt"))
            _set_rng_state(_load_tensors(folder / f"rng_state_{self.accelerator.process_index}.pt"))
        except CheckpointError as error:
            raise CheckpointError(f"{error} {self._intact_before(folder)}") from error
        except (OSError, RuntimeError, ValueError, KeyError, safetensors.SafetensorError) as error:
            raise CheckpointError(
                f"{folder} is damaged ({type(error).__name__}: {' '.join(str(error).split())[:300]}). "
                f"{self._intact_before(folder)}"
            ) from error
        return trainer_state

    def _intact_before(self, folder: Path) -> str:
        """Which earlier checkpoint of the folder reads whole, for the user to resume from instead."""
        step = int(CHECKPOINT_NAME.fullmatch(folder.name)[1]) if CHECKPOINT_NAME.fullmatch(folder.name) else None
        for earlier in reversed([s for s in checkpoint_steps(folder.parent) if step is None or s < step]):
            candidate = folder.parent / f"checkpoint-{earlier}"
            if is_intact(candidate):
                return f"{candidate} is intact: resume from it with --resume_from_checkpoint {candidate}."
        return "No earlier checkpoint in its folder is intact."


def is_intact(folder: Path) -> bool:
    """Whether every file of the checkpoint reads back (safetensors, tensors, JSON) and its weights are finite."""
    try:
        read_state(folder)
        for path in folder.iterdir():
            if path.suffix == ".safetensors":
                if not _finite(safetensors.torch.load_file(path)):
                    return False
            elif path.suffix == ".pt":
                _load_tensors(path)
    except Exception:  # any failure to read means "not intact"
        return False
    return True


def _finite(weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())


def _load_tensors(path: Path):
    """torch.load of tensors and plain Python values only: a pickled object is refused, never constructed."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if unsafe := unsafe_pickle_globals(path):  # None or []: damaged rather than unsafe
            raise CheckpointError(
                f"{path} holds pickled Python objects ({', '.join(unsafe[:3])}), not only tensors: refused for "
                "safety, since loading it could run code."
            ) from error
        raise


def _rng_state() -> dict:
    """This process's generator states, as tensors and plain numbers (nothing that needs unpickling)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": position,
            "has_gauss": has_gauss,
            "cached_gaussian": cached_gaussian,
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            numpy["keys"].numpy().astype(np.uint32),
            numpy["position"],
            numpy["has_gauss"],
            numpy["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
