"""The output folder of a run: what the objective saves (`Objective.save`: the model, a grid, the model card), then
metrics.json and training_config.json; then the optional push to the Hub. `written_files.json` records, as each file
is written, its name and SHA-256 and the run's id: what the run may replace when it resumes, what a later export may
remove as its own, and what a push uploads."""

import fnmatch
import glob
import hashlib
import json
import os
import tempfile
from pathlib import Path, PurePosixPath

import torch

from ..hub import upload_folder_to_hub
from .checkpoints import CheckpointError, checkpoint_steps, latest_checkpoint, read_state, run_ids
from .config import RunConfig

RECORD_FILE = "written_files.json"  # {"run_id": ..., "files": {name: sha256}}: what the run wrote, as it wrote it
# What every run writes into its output folder besides its checkpoint-{step} folders and what its objective saves
# (`Objective.output_patterns`): a new run never overwrites these unless told to.
OUTPUT_PATTERNS = ("README.md", "metrics.json", "training_config.json", "logs", RECORD_FILE)
# The names diffusers' `save_pretrained` gives a model's files in any layout (one file or shards and their index,
# safetensors or .bin, any variant) and the modeling file saved beside a CustomVAE: what an earlier save into the same
# folder may have left that would load instead of the model saved now.
MODEL_FILE_PATTERNS = (
    "diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.bin", "diffusion_pytorch_model*.index.json",
    "modeling_custom_vae.py",
)  # fmt: skip


def check_output_dir(config: RunConfig, objective_patterns: tuple[str, ...] = ()):
    """Refuses, before anything is written, an `output_dir` that is a file or cannot be created, and one holding
    what the run would overwrite unless `overwrite_output_dir` says to replace it: for a new run, a user's README.md
    or an earlier run's model or checkpoints (`OUTPUT_PATTERNS` and the objective's); for a resume, any file of a
    folder that is neither the checkpoint's run's nor empty, and in the run's own folder any file the run would
    write over that its record (`RECORD_FILE`) does not hold as the run wrote it. (Another run's checkpoints are
    never replaced, even so: see `Checkpoints`.)"""
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
    patterns = (*OUTPUT_PATTERNS, *objective_patterns)
    if resumed is not None:
        try:
            run_id = read_state(resumed)["run_id"]
        except (CheckpointError, OSError):
            return  # the resume names what is wrong with the checkpoint, before anything is written
        names = sorted(path.name for path in output_dir.iterdir())
        if run_id in run_ids(output_dir):  # a resumed run rewrites what its earlier part wrote, and only that
            if theirs := files_not_written_by(output_dir, run_id, patterns):
                raise ValueError(
                    f"--output_dir {output_dir} holds {', '.join(theirs[:6])}{' ...' if len(theirs) > 6 else ''}, "
                    "which this run did not write (or which changed since it did) and would overwrite: move "
                    f"{'it' if len(theirs) == 1 else 'them'}, or pass --overwrite_output_dir to replace "
                    f"{'it' if len(theirs) == 1 else 'them'}."
                )
            return
        if not names:
            return
        raise ValueError(
            f"--output_dir {output_dir} holds {', '.join(names[:6])}{' ...' if len(names) > 6 else ''} and no "
            f"checkpoint of the run {resumed} belongs to: resume into that run's folder or an empty one, or pass "
            "--overwrite_output_dir."
        )
    checkpoints = [f"checkpoint-{step}" for step in checkpoint_steps(output_dir)]
    names = sorted(path.name for path in output_dir.iterdir())
    clashes = [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    clashes += checkpoints
    if clashes:
        resume = "continue that run with --resume_from_checkpoint latest, " if checkpoints else ""
        raise ValueError(
            f"--output_dir {output_dir} already holds {', '.join(clashes[:6])}{' ...' if len(clashes) > 6 else ''}, "
            f"which a new run would overwrite: {resume}choose another --output_dir, or pass --overwrite_output_dir."
        )


def read_record(output_dir: str | os.PathLike) -> tuple[str | None, dict[str, str]]:
    """(run id, {name: SHA-256}) of the record of what a run wrote into `output_dir`; (None, {}) where there is none
    or it does not read. Only names inside the folder count."""
    try:
        record = json.loads((Path(output_dir) / RECORD_FILE).read_text())
        files = {str(name): str(digest) for name, digest in record["files"].items()}
        inside = {name: digest for name, digest in files.items() if _inside(name)}
        return str(record["run_id"]), inside
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, {}


def _inside(name: str) -> bool:
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and ".." not in path.parts and "\\" not in name


def files_not_written_by(output_dir: Path, run_id: str, patterns: tuple[str, ...]) -> list[str]:
    """The files under `output_dir`'s entries named like `patterns` (what a run's export writes; not `logs`, whose
    event files are never overwritten) that the record does not hold as the run `run_id` wrote them: the user's."""
    recorded_run, recorded = read_record(output_dir)
    ours = recorded if recorded_run == run_id else {}
    theirs = []
    for entry in sorted(Path(output_dir).iterdir()):
        if entry.name in ("logs", RECORD_FILE) or not any(fnmatch.fnmatch(entry.name, p) for p in patterns):
            continue
        for path in [entry] if entry.is_file() else sorted(p for p in entry.rglob("*") if p.is_file()):
            name = path.relative_to(output_dir).as_posix()
            if ours.get(name) != _sha256(path):
                theirs.append(name)
    return theirs


class WrittenFiles:
    """The files an export writes into `folder`, by name with the SHA-256 of their content as written: what a push
    uploads, exactly (a file changed since it was written stays home), and the record (`RECORD_FILE`, saved after
    each file) by which a resumed run of `run_id` knows its own files.

    A file is written over only where it is this run's as recorded, or `replace_any` (`--overwrite_output_dir`); a file
    that appeared during the run is left as it is, with a warning. The model files of an earlier save in another
    layout (shards and their index, a `.bin`) are removed once the model is saved, so the folder loads this one.
    """

    def __init__(self, folder: Path, run_id: str = "", replace_any: bool = False):
        self.folder, self.hashes, self.run_id, self.replace_any = Path(folder), {}, run_id, replace_any
        self.folder.mkdir(parents=True, exist_ok=True)
        earlier_run, earlier = read_record(self.folder)
        # What an earlier export wrote here that this one may replace or remove: this run's earlier part's, or, when
        # told to overwrite, any earlier run's.
        self.earlier = earlier if earlier_run == run_id or replace_any else {}

    def write(self, name: str, content: bytes):
        if self._may_write(name):
            (self.folder / name).write_bytes(content)
            self.hashes[name] = hashlib.sha256(content).hexdigest()
            self._save_record()

    def save_with(self, save):
        """`save(folder)` (e.g. a model's `save_pretrained`) into a temporary folder beside the output, then each file
        moved in (subfolders too), so that what it wrote is known; then what an earlier save left of a model in the
        same folders under the names of diffusers' weights (`MODEL_FILE_PATTERNS`) and this save did not write again
        is removed, so the folder loads this model."""
        with tempfile.TemporaryDirectory(dir=self.folder, prefix=".saving-") as temporary:
            save(temporary)
            files = (path for path in Path(temporary).rglob("*") if path.is_file())
            saved = sorted(path.relative_to(temporary).as_posix() for path in files)
            for name in filter(self._may_write, saved):
                self.hashes[name] = _sha256(Path(temporary, name))
                (self.folder / name).parent.mkdir(parents=True, exist_ok=True)
                os.replace(Path(temporary, name), self.folder / name)
        for folder in sorted({(self.folder / name).parent for name in saved}):
            for path in sorted(folder.iterdir()):
                name = path.relative_to(self.folder).as_posix()
                model_file = any(fnmatch.fnmatch(path.name, pattern) for pattern in MODEL_FILE_PATTERNS)
                if model_file and path.is_file() and name not in self.hashes and self._replaceable(name):
                    path.unlink()
        self._save_record()

    def save_model(self, model):
        """`model.save_pretrained`, through `save_with`."""
        self.save_with(model.save_pretrained)

    def remove_stale(self):
        """Removes what the earlier export recorded and this one did not write again, where it is still as written
        (a file changed since is the user's now), and records this export's files alone."""
        for name in sorted(set(self.earlier) - set(self.hashes)):
            path = self.folder / name
            if path.is_file() and _sha256(path) == self.earlier[name]:
                path.unlink()
        self.earlier = {}
        self._save_record()

    def unchanged(self) -> tuple[list[str], list[str]]:
        """(names whose content is still as written, names changed or removed since)."""
        same = [name for name, digest in self.hashes.items() if (self.folder / name).is_file()
                and _sha256(self.folder / name) == digest]  # fmt: skip
        return sorted(same), sorted(set(self.hashes) - set(same))

    def _replaceable(self, name: str) -> bool:
        """Whether the file `name` may be written over or removed: when told to overwrite, or where it is as the
        earlier export recorded it."""
        path = self.folder / name
        return self.replace_any or (path.is_file() and self.earlier.get(name) == _sha256(path))

    def _may_write(self, name: str) -> bool:
        path = self.folder / name
        if name in self.hashes or not path.exists() or self._replaceable(name):
            return True
        print(
            f"Warning: left {path} as it is: this run did not write it (it appeared during the run), so the run's "
            f"own {name} was not saved. Move the file, then write the output folder again with "
            "--resume_from_checkpoint latest."
        )
        return False

    def _save_record(self):
        """The record, replaced whole (a reader never sees half of it): this export's files, and while it runs the
        earlier export's too (an export that stops half-way leaves its files known as the run's)."""
        record = {"run_id": self.run_id, "files": {**self.earlier, **self.hashes}}
        partial = self.folder / f".{RECORD_FILE}.partial"
        partial.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        os.replace(partial, self.folder / RECORD_FILE)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@torch.no_grad()
def write_output_folder(
    model, objective, data, config: RunConfig, num_processes: int, throughput: dict, run_id: str = ""
) -> dict:
    """Writes the output folder of the run `run_id` (see the module docstring) and pushes it when
    `config.push_to_hub`; returns what metrics.json holds: the objective's held-out metrics and the training
    throughput."""
    output_dir = Path(config.output_dir)
    written = WrittenFiles(output_dir, run_id, replace_any=config.overwrite_output_dir)
    model.eval()
    written.write("training_config.json", (json.dumps(config.to_json_dict(), indent=2) + "\n").encode())
    training = training_summary(config, objective, num_processes, throughput)
    metrics = objective.save(model, data, written, training)  # the model first, then its grid and card
    summary = {**metrics, "split": data.test_description, "images": len(data.test), **throughput}
    written.write("metrics.json", (json.dumps(summary, indent=2) + "\n").encode())
    written.remove_stale()
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
