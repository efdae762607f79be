"""Checkpoints and the output folder lose nothing and run nothing: pruning touches only this run's checkpoints and
never the one just written, the user's own folders and files are left alone, a resume never unpickles, and a
damaged checkpoint names the intact one to resume from instead."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.training import checkpoint_steps
from diffusers_custom_vae.training.checkpoints import STATE_FILE, latest_checkpoint
from diffusers_custom_vae.training.export import RECORD_FILE
from diffusers_custom_vae.training.trainer import Trainer

TINY_8X = {"block_out_channels": [8, 8, 16, 16], "layers_per_block": 1, "norm_num_groups": 4, "num_attention_heads": 2}


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for index in range(6):
        Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)).save(root / f"{index}.png")
    return root


@pytest.fixture
def train_vae(image_folder, tmp_path, run_example):
    """train_vae(output_dir, *flags): a tiny run on six small images, 2 steps, checkpoints every step."""
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_8X))

    def run(output_dir, *flags):
        argv = ["--model_config", str(tmp_path / "tiny.json"), "--train_data_dir", str(image_folder)]
        argv += [
            "--output_dir",
            str(output_dir),
            "--resolution",
            "16",
            "--train_batch_size",
            "2",
            "--report_to",
            "none",
        ]
        argv += ["--max_train_steps", "2", "--checkpointing_steps", "1", "--validation_steps", "100", *flags]
        return run_example("train_vae", argv)

    return run


def error_line(capsys) -> str:
    """The one line a user's mistake ends with (after any progress bars), checked to be the only error output."""
    error = capsys.readouterr().err
    last = error.rstrip("\n").split("\n")[-1].split("\r")[-1]
    assert last.startswith("train_vae.py: error: ") and "Traceback" not in error, error
    return last


def earlier_runs_checkpoint(output_dir: Path, step: int = 100) -> Path:
    """A checkpoint an earlier, longer run left behind."""
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / STATE_FILE).write_text(json.dumps({"run_id": "earlier", "step": step, "epoch": 9, "epoch_batches": 0}))
    os.utime(folder, (1, 1))
    return folder


def test_a_new_run_refuses_an_earlier_runs_checkpoints_before_writing_anything(train_vae, tmp_path, capsys):
    out = tmp_path / "out"
    earlier_runs_checkpoint(out)
    with pytest.raises(SystemExit):
        train_vae(out, "--checkpoints_total_limit", "1")
    error = error_line(capsys)
    assert "checkpoint-100" in error and "--resume_from_checkpoint latest" in error
    assert sorted(path.name for path in out.iterdir()) == ["checkpoint-100"]


def test_pruning_never_deletes_the_checkpoint_just_written_nor_another_runs(train_vae, tmp_path, capsys):
    """With an earlier run's checkpoint-100 beside it and a limit of 1, a run keeps its own newest checkpoint, and
    `latest` resumes this run, saying that the folder also holds another run's."""
    out = tmp_path / "out"
    earlier = earlier_runs_checkpoint(out)
    train_vae(out, "--checkpoints_total_limit", "1", "--overwrite_output_dir")
    assert checkpoint_steps(out) == [2, 100] and earlier.is_dir()
    assert latest_checkpoint(out) == out / "checkpoint-2"
    capsys.readouterr()
    train_vae(out, "--checkpoints_total_limit", "1", "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    output = capsys.readouterr().out
    assert "checkpoint-2 at step 2" in output and "other runs" in output and "checkpoint-100" in output
    assert checkpoint_steps(out) == [3, 100]


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_checkpoint_limit_below_one_is_refused(train_vae, tmp_path, capsys, limit):
    with pytest.raises(SystemExit):
        train_vae(tmp_path / "out", "--checkpoints_total_limit", limit)
    error = error_line(capsys)
    assert "--checkpoints_total_limit" in error and f"got {limit}" in error
    assert not (tmp_path / "out").exists()


def test_the_users_own_checkpoint_like_folders_are_left_alone(train_vae, tmp_path):
    out = tmp_path / "out"
    users = ["checkpoint-2-backup", "checkpoint-7-old", "checkpoint-final.partial", "checkpoint-3.partial.keep"]
    users += ["checkpoint-002", "checkpoint-01.partial"]  # not the trainer's checkpoint-2, nor its partial save
    for name in users:
        (out / name).mkdir(parents=True)
        (out / name / "notes.txt").write_text("mine")
    train_vae(out, "--checkpoints_total_limit", "1")
    assert checkpoint_steps(out) == [2] and latest_checkpoint(out) == out / "checkpoint-2"
    assert all((out / name / "notes.txt").read_text() == "mine" for name in users)
    train_vae(out, "--checkpoints_total_limit", "1", "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert checkpoint_steps(out) == [3] and all((out / name).is_dir() for name in users)


def test_the_users_files_in_the_output_folder_are_never_overwritten(train_vae, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("my notes")
    (out / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        train_vae(out)
    error = error_line(capsys)
    assert "README.md" in error and "config.json" in error and "--overwrite_output_dir" in error
    assert (out / "README.md").read_text() == "my notes"
    assert sorted(path.name for path in out.iterdir()) == ["README.md", "config.json"]


def test_an_output_folder_that_is_a_file_is_refused_before_training(train_vae, tmp_path, capsys):
    (tmp_path / "out").write_text("a file")
    with pytest.raises(SystemExit):
        train_vae(tmp_path / "out")
    assert "--output_dir" in error_line(capsys) and (tmp_path / "out").read_text() == "a file"


def test_resume_never_unpickles(train_vae, tmp_path, capsys):
    """A checkpoint from someone else whose optimiser file holds a pickled callable: refused, and it never runs."""
    out = tmp_path / "out"
    train_vae(out)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))  # would create `marker` if it were unpickled

    torch.save({"state": {}, "param_groups": [], "payload": Payload()}, out / "checkpoint-2" / "optimizer.pt")
    with pytest.raises(SystemExit):
        train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    error = error_line(capsys)
    assert "optimizer.pt" in error and "pickled" in error
    assert f"--resume_from_checkpoint {out / 'checkpoint-1'}" in error
    assert not marker.exists()


def test_an_accelerate_pickle_checkpoint_is_refused_not_loaded(train_vae, tmp_path, capsys):
    out = tmp_path / "out"
    old = out / "checkpoint-5"
    old.mkdir(parents=True)
    (old / "random_states_0.pkl").write_bytes(b"\x80\x04K\x01.")
    (old / "model.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit):
        train_vae(out, "--resume_from_checkpoint", "latest")
    error = error_line(capsys)
    assert "checkpoint-5" in error and "random_states_0.pkl" in error and "never loaded" in error


@pytest.mark.parametrize("damaged", ["model.safetensors", "scheduler.pt", STATE_FILE, "rng_state_0.pt"])
def test_a_damaged_latest_checkpoint_names_itself_and_the_intact_one_before(train_vae, tmp_path, capsys, damaged):
    out = tmp_path / "out"
    train_vae(out)
    path = out / "checkpoint-2" / damaged
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(SystemExit):
        train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    error = error_line(capsys)
    assert "checkpoint-2" in error and ("damaged" in error or "not written by this version" in error)
    assert f"--resume_from_checkpoint {out / 'checkpoint-1'}" in error
    train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-1"))
    assert checkpoint_steps(out) == [1, 2, 3]


# ---------------------------------------------------------------------- resume: the output folder and the run's record


def test_a_resume_into_a_folder_of_the_users_files_is_refused(train_vae, tmp_path, capsys):
    """Run A's checkpoint resumed into a folder holding the user's README.md: refused, the folder untouched; into a
    new folder it resumes."""
    train_vae(tmp_path / "runA")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my notes")
    resume = ["--max_train_steps", "3", "--resume_from_checkpoint", str(tmp_path / "runA" / "checkpoint-2")]
    with pytest.raises(SystemExit) as exit_info:
        train_vae(mine, *resume)
    error = error_line(capsys)
    assert exit_info.value.code == 2 and "--output_dir" in error and "README.md" in error
    assert "--overwrite_output_dir" in error
    assert sorted(path.name for path in mine.iterdir()) == ["README.md"]
    assert (mine / "README.md").read_text() == "my notes"
    train_vae(tmp_path / "new", *resume)
    assert checkpoint_steps(tmp_path / "new") == [3]


def test_another_runs_checkpoints_are_never_replaced_even_when_overwriting(train_vae, tmp_path, capsys):
    """Run A resumed into run B's finished folder: refused; with --overwrite_output_dir, still refused before
    training while B's checkpoints lie where A would save, and B's checkpoint-4 keeps B's weights."""
    train_vae(tmp_path / "runA")
    run_b = tmp_path / "runB"
    train_vae(run_b, "--max_train_steps", "4", "--seed", "1")
    b_state = (run_b / "checkpoint-4" / STATE_FILE).read_text()
    b_files = sorted(path.name for path in run_b.rglob("*"))
    resume = ["--max_train_steps", "4", "--resume_from_checkpoint", str(tmp_path / "runA" / "checkpoint-2")]
    for extra in ([], ["--overwrite_output_dir"]):
        with pytest.raises(SystemExit):
            train_vae(run_b, *resume, *extra)
        error = error_line(capsys)
        assert "runB" in error and ("checkpoint-3" in error if extra else "--overwrite_output_dir" in error), error
        assert (run_b / "checkpoint-4" / STATE_FILE).read_text() == b_state
        assert sorted(path.name for path in run_b.rglob("*")) == b_files


def test_a_resume_into_its_own_folder_never_overwrites_a_file_the_run_did_not_write(train_vae, tmp_path, capsys):
    """The user's README.md put into the run's own folder after it finished: a resume is refused before any step,
    naming the file, which is untouched; their other files are left alone. Moved away, the resume writes the card
    and records it as the run's."""
    out = tmp_path / "out"
    train_vae(out)
    (out / "README.md").write_text("my notes")
    (out / "notes.txt").write_text("mine")
    files = sorted(path.name for path in out.rglob("*"))
    with pytest.raises(SystemExit) as exit_info:
        train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    error = error_line(capsys)
    assert exit_info.value.code == 2 and "README.md" in error and "--overwrite_output_dir" in error
    assert "config.json" not in error  # the run's own files, as it wrote them, are its to replace
    assert (out / "README.md").read_text() == "my notes" and sorted(path.name for path in out.rglob("*")) == files
    (out / "README.md").rename(tmp_path / "README.md")
    train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert checkpoint_steps(out) == [1, 2, 3] and (out / "notes.txt").read_text() == "mine"
    assert "README.md" in json.loads((out / RECORD_FILE).read_text())["files"]


def test_a_file_that_appears_during_the_run_is_left_as_it_is(train_vae, tmp_path, capsys, monkeypatch):
    """A README.md the user writes while the run trains is not overwritten by the export, which says so; a resume at
    the last step, once it is moved, writes the card."""
    out = tmp_path / "out"
    fit = Trainer.fit

    def fit_while_the_user_writes(self):
        fit(self)
        (out / "README.md").write_text("my notes")

    monkeypatch.setattr(Trainer, "fit", fit_while_the_user_writes)
    train_vae(out)
    assert "left" in capsys.readouterr().out and (out / "README.md").read_text() == "my notes"
    assert CustomVAE.from_pretrained(out) is not None  # the rest of the output folder is written
    assert "README.md" not in json.loads((out / RECORD_FILE).read_text())["files"]
    monkeypatch.undo()
    (out / "README.md").unlink()
    train_vae(out, "--resume_from_checkpoint", "latest")
    assert (out / "README.md").read_text().startswith("---") and checkpoint_steps(out) == [1, 2]


def test_overwriting_a_finished_run_removes_its_model_in_another_layout_and_nothing_else(train_vae, tmp_path):
    """An earlier model saved sharded and as .bin, an earlier run's record of its samples.png, the user's notes and
    an edited file the record lists, another run's checkpoint: --overwrite_output_dir leaves a folder that loads the
    new model, and removes only the earlier model's files and what the earlier run wrote, unchanged."""
    out = tmp_path / "out"
    torch.manual_seed(1)
    earlier = CustomVAE(**TINY_8X)
    earlier.save_pretrained(tmp_path / "as_bin", safe_serialization=False)
    earlier.save_pretrained(out, max_shard_size="20KB")
    os.replace(tmp_path / "as_bin" / "diffusion_pytorch_model.bin", out / "diffusion_pytorch_model.bin")
    (out / "samples.png").write_bytes(b"an earlier run's samples")
    (out / "edited.txt").write_text("the earlier run wrote this, the user edited it")
    digests = {name: hashlib.sha256(b"an earlier run's samples").hexdigest() for name in ["samples.png", "edited.txt"]}
    (out / RECORD_FILE).write_text(json.dumps({"run_id": "earlier", "files": digests}))
    (out / "notes.txt").write_text("mine")
    other_run = earlier_runs_checkpoint(out)
    assert len(list(out.glob("diffusion_pytorch_model-0000*-of-*.safetensors"))) > 1
    train_vae(out, "--overwrite_output_dir")
    model_files = sorted(path.name for path in out.glob("diffusion_pytorch_model*"))
    assert model_files == ["diffusion_pytorch_model.safetensors"]
    new = safetensors.torch.load_file(out / "diffusion_pytorch_model.safetensors")
    loaded = CustomVAE.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[name], weights) for name, weights in new.items())
    assert not (out / "samples.png").exists() and (out / "edited.txt").is_file()
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((other_run / STATE_FILE).read_text())["run_id"] == "earlier"


def test_latest_does_not_skip_the_guard(train_vae, tmp_path, capsys):
    """`latest` resumes this run's newest checkpoint, and is refused where it would save over another run's."""
    out = tmp_path / "out"
    train_vae(out)
    earlier = earlier_runs_checkpoint(out, step=3)
    with pytest.raises(SystemExit):
        train_vae(out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert "checkpoint-3" in error_line(capsys)
    assert json.loads((earlier / STATE_FILE).read_text())["run_id"] == "earlier"
    assert checkpoint_steps(out) == [1, 2, 3]


def test_an_output_folder_inside_a_file_is_refused_before_training(train_vae, image_folder, tmp_path, capsys):
    inside_a_file = tmp_path / "data" / "img000.png" / "sub"
    inside_a_file.parent.parent.mkdir()
    inside_a_file.parent.write_bytes((image_folder / "0.png").read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        train_vae(inside_a_file)
    error = error_line(capsys)
    assert exit_info.value.code == 2 and "img000.png" in error and "cannot be created" in error
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["data", "img000.png", "tiny.json"]


def test_a_resume_with_another_model_config_says_so(train_vae, tmp_path, capsys):
    """Another config is named with the flag it came from; the same config in another file is no change."""
    out = tmp_path / "out"
    train_vae(out)
    (tmp_path / "wider.json").write_text(json.dumps({**TINY_8X, "block_out_channels": [8, 8, 16, 32]}))
    with pytest.raises(SystemExit):
        train_vae(out, "--model_config", str(tmp_path / "wider.json"), "--resume_from_checkpoint", "latest")
    error = error_line(capsys)
    assert "model config" in error and "block_out_channels" in error and "[8, 8, 16, 16]" in error
    assert f"--model_config {tmp_path / 'wider.json'}" in error
    assert "damaged" not in error and "intact" not in error
    assert checkpoint_steps(out) == [1, 2]
    (tmp_path / "same.json").write_text(json.dumps(TINY_8X, indent=4))
    train_vae(
        out,
        "--model_config",
        str(tmp_path / "same.json"),
        "--max_train_steps",
        "3",
        "--resume_from_checkpoint",
        "latest",
    )
    assert checkpoint_steps(out) == [1, 2, 3]


@pytest.mark.parametrize(
    "changed, named",
    [
        (
            ["--learning_rate", "0.1", "--lr_scheduler", "constant"],
            ["learning_rate", "0.001", "lr_scheduler", "cosine"],
        ),
        (["--seed", "7", "--train_batch_size", "3"], ["seed", "train_batch_size"]),
        (["--resolution", "8"], ["resolution", "[16, 16]"]),
    ],
)
def test_a_resume_that_changes_the_runs_settings_is_refused(train_vae, tmp_path, capsys, changed, named):
    """Resuming with another learning rate trained at the checkpoint's while the record said the new one: now each
    changed setting is named with the value the checkpoint keeps, and nothing is written."""
    out = tmp_path / "out"
    train_vae(out)
    files = sorted(path.name for path in out.rglob("*"))
    with pytest.raises(SystemExit):
        train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", *changed)
    error = error_line(capsys)
    assert all(word in error for word in named), error
    assert sorted(path.name for path in out.rglob("*")) == files
    train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")  # the same settings resume
    assert json.loads((out / "training_config.json").read_text())["learning_rate"] == 1e-3


def test_a_resume_on_another_data_folder_is_refused(train_vae, image_folder, tmp_path, capsys, monkeypatch):
    """The same folder by another relative path resumes; another folder is named with the checkpoint's."""
    out = tmp_path / "out"
    train_vae(out)
    other = tmp_path / "other"
    other.mkdir()
    for path in image_folder.iterdir():
        (other / path.name).write_bytes(path.read_bytes())
    with pytest.raises(SystemExit):
        train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--train_data_dir", str(other))
    error = error_line(capsys)
    assert "train_data_dir" in error and str(image_folder) in error and checkpoint_steps(out) == [1, 2]
    monkeypatch.chdir(image_folder.parent)
    train_vae(
        out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest", "--train_data_dir", image_folder.name
    )
    assert checkpoint_steps(out) == [1, 2, 3]


def test_a_local_dataset_is_the_same_setting_by_any_path_and_another_by_the_same_one(
    tmp_path, run_example, capsys, monkeypatch
):
    """`--dataset_name` naming a local dataset, like `--train_data_dir`, is recorded by where it is: resumed from
    another working folder by another relative path it is the same; the same relative name elsewhere is another."""
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    for name in ("ds", "elsewhere/ds"):
        images = [Image.fromarray((rng.random((24, 32, 3)) * 255).astype(np.uint8)) for _ in range(6)]
        datasets.Dataset.from_dict({"image": images}).save_to_disk(str(tmp_path / name))
    (tmp_path / "tiny.json").write_text(json.dumps(TINY_8X))

    def train(dataset, steps, *extra):
        argv = ["--model_config", str(tmp_path / "tiny.json"), "--dataset_name", dataset, "--output_dir", str(out)]
        argv += ["--resolution", "16", "--train_batch_size", "2", "--report_to", "none", "--checkpointing_steps", "1"]
        return run_example("train_vae", [*argv, "--max_train_steps", steps, "--validation_steps", "100", *extra])

    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    train("ds", "2")
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(SystemExit):
        train("ds", "3", "--resume_from_checkpoint", "latest")
    error = error_line(capsys)
    assert "dataset_name" in error and str(tmp_path / "elsewhere" / "ds") in error and f"'{tmp_path / 'ds'}'" in error
    assert checkpoint_steps(out) == [1, 2]
    train("../ds", "3", "--resume_from_checkpoint", "latest")
    assert checkpoint_steps(out) == [1, 2, 3]


def test_a_checkpoint_with_non_finite_weights_is_not_called_intact(train_vae, tmp_path, capsys):
    out = tmp_path / "out"
    train_vae(out)
    path = out / "checkpoint-2" / "model.safetensors"
    weights = safetensors.torch.load_file(path)
    weights[next(iter(weights))][...] = float("nan")
    safetensors.torch.save_file(weights, path)
    with pytest.raises(SystemExit):
        train_vae(out, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    error = error_line(capsys)
    assert "model.safetensors" in error and "non-finite" in error
    assert f"--resume_from_checkpoint {out / 'checkpoint-1'}" in error
